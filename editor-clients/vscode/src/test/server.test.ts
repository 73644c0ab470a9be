// The extension's conversation with the real `livekv lsp`, outside VS Code: the same settings,
// requests and status text (requests.ts), sent over vscode-languageserver-protocol's node
// connection as vscode-languageclient sends them; typing arrives as one didChange per key.
// The suggestion must equal `livekv complete` on the final text (the engine, opened fresh).
//   LIVEKV_SERVER=/path/to/livekv node --test out/test/   (default: the repo's .venv/bin/livekv)
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import {
  CancellationTokenSource, createProtocolConnection, InlineCompletionList, ProtocolConnection, ResponseError,
  StreamMessageReader, StreamMessageWriter,
} from 'vscode-languageserver-protocol/node';
import {
  INLINE_COMPLETION, STATS, DocStats, inlineCompletionParams, readSettings, serverCommand, serverSettings,
  statsParams, statusText, suggestions,
} from '../requests';

const REPO_LIVEKV = resolve(__dirname, '../../../../.venv/bin/livekv');
const LIVEKV = process.env.LIVEKV_SERVER || (existsSync(REPO_LIVEKV) ? REPO_LIVEKV : 'livekv');
const MAX_NEW = 6;
// one torch thread: two processes on two shared cores are much steadier; offline: a missing
// model fails at once instead of trying the hub
const ENV = { ...process.env, OMP_NUM_THREADS: '1', HF_HUB_OFFLINE: '1', TOKENIZERS_PARALLELISM: 'false' };

const TEXT = `"""Points and shapes on a plane."""
import math


class Point:
    """A point (x, y)."""

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def distance(self, other):
        dx = self.x - other.x
        dy = self.y - other.y
        return math.sqrt(dx * dx + dy * dy)

    def __repr__(self):
        return f"Point({self.x}, {self.y})"


class Circle:
    """A circle with a center and a radius."""

    def __init__(self, center, radius):
        self.center = center
        self.radius = radius

    def area(self):
        return math.pi * self.radius ** 2

    def contains(self, point):
        return self.center.distance(point) <= self.radius
`;

const sha = (s: string) => createHash('sha256').update(s, 'utf8').digest('hex');

interface Key { key: string; line: number; character: number; after: string; cursor: { line: number; character: number } }

/** Typing `keys` one at a time from (line, character): where each goes, the text and cursor after
 * it. Lines end at \n and the text is ASCII, so characters are UTF-16 code units. */
function typing(text: string, line: number, character: number, keys: string[]): Key[] {
  return keys.map((key) => {
    const lines = text.split('\n');
    const at = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0) + character;
    text = text.slice(0, at) + key + text.slice(at);
    const k = { key, line, character, after: text, cursor: key === '\n' ? { line: line + 1, character: 0 } : { line, character: character + 1 } };
    ({ line, character } = k.cursor);
    return k;
  });
}

/** What the engine completes on `text` opened fresh: `livekv complete` prints it and a newline. */
function engineCompletion(text: string, line: number, character: number): Promise<string> {
  const file = join(mkdtempSync(join(tmpdir(), 'livekv-vscode-')), 'shapes.py');
  writeFileSync(file, text);
  return new Promise((ok, fail) => {
    execFile(LIVEKV, ['complete', '--max-new-tokens', String(MAX_NEW), file, String(line), String(character)],
             { env: ENV, timeout: 240_000 }, (err, stdout, stderr) => {
      if (err) {
        fail(new Error(`${LIVEKV} complete failed: ${err.message}\n${stderr.slice(-2000)}`));
      } else {
        ok(stdout.endsWith('\n') ? stdout.slice(0, -1) : stdout);
      }
    });
  });
}

function startServer(): { proc: ChildProcess; conn: ProtocolConnection; stderr: () => string; exited: Promise<number | null> } {
  // the extension's own command line: `<serverPath> lsp`
  const { command, args } = serverCommand(readSettings((k) => (k === 'serverPath' ? LIVEKV : undefined)));
  const proc = spawn(command, args, { env: ENV, stdio: ['pipe', 'pipe', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (d) => { err = (err + d).slice(-20_000); });
  const exited = new Promise<number | null>((ok) => proc.on('exit', (code) => ok(code)));
  proc.on('error', (e) => { err += `\ncould not start ${command}: ${e.message}`; });
  const conn = createProtocolConnection(new StreamMessageReader(proc.stdout!), new StreamMessageWriter(proc.stdin!));
  return { proc, conn, stderr: () => err, exited };
}

test('settings: only keys the server knows, optional ones only when set', () => {
  const defaults = serverSettings(readSettings(() => undefined));
  assert.deepEqual(defaults, { livekv: { model: null, strategy: 'pie', maxNewTokens: 48 } });
  const set: Record<string, unknown> = {
    model: ' smollm2-135m ', strategy: 'nonsense', maxNewTokens: 0, prefetch: false, maxPromptMs: 80,
    candidates: '3', serverPath: '/opt/livekv', debounceMs: 10, somethingElse: 1, repoContext: false,
    maxCacheTokens: 4096,
  };
  const s = readSettings((k) => set[k]);
  // a wrong value falls back to the default rather than make the server refuse every setting
  assert.deepEqual(serverSettings(s), {
    livekv: { model: 'smollm2-135m', strategy: 'pie', maxNewTokens: 48, prefetch: false, maxPromptMs: 80,
              repoContext: false, maxCacheTokens: 4096 },
  });
  assert.deepEqual(serverCommand(s), { command: '/opt/livekv', args: ['lsp'] });
  assert.deepEqual(serverCommand(readSettings((k) => (k === 'serverPath' ? '~/venv/bin/livekv' : undefined)), '/home/me'),
                   { command: '/home/me/venv/bin/livekv', args: ['lsp'] });
});

test('the extension\'s requests get the engine\'s suggestion from livekv lsp', { timeout: 300_000 }, async () => {
  // a person opens a line after area() and types a method header, one didChange per key
  const lines = TEXT.split('\n');
  const row = lines.indexOf('        return math.pi * self.radius ** 2');
  const keys = typing(TEXT, row, lines[row].length, ['\n', '\n', ...'    def perimeter(self):']);
  const { after: text, cursor } = keys[keys.length - 1];
  // the engine's answer for the final text, in its own process, while the server works
  const engine = engineCompletion(text, cursor.line, cursor.character);
  engine.catch(() => undefined);  // awaited at the end; no unhandled rejection meanwhile

  const { proc, conn, stderr, exited } = startServer();
  const errors: string[] = [];
  conn.onNotification('window/logMessage', (p: { type: number; message: string }) => {
    if (p.type === 1) errors.push(p.message);
  });
  conn.onNotification('window/showMessage', (p: { type: number; message: string }) => {
    if (p.type === 1) errors.push(p.message);
  });
  conn.onRequest('window/workDoneProgress/create', () => null);  // VS Code shows the first encode's progress
  conn.onNotification('$/progress', () => undefined);
  conn.listen();
  try {
    // initialize as vscode-languageclient does, with the extension's initializationOptions
    const settings = readSettings((k) => ({ maxNewTokens: MAX_NEW } as Record<string, unknown>)[k]);
    const init = await conn.sendRequest('initialize', {
      processId: process.pid,
      clientInfo: { name: 'livekv-vscode-test' },
      rootUri: null,
      capabilities: {
        general: { positionEncodings: ['utf-16'] },
        textDocument: { synchronization: { dynamicRegistration: true }, inlineCompletion: { dynamicRegistration: true } },
        window: { workDoneProgress: true },
      },
      initializationOptions: serverSettings(settings),
    }) as { capabilities: { inlineCompletionProvider?: unknown; textDocumentSync?: { change?: number } } };
    assert.ok(init.capabilities.inlineCompletionProvider, 'the server does not offer inline completion');
    assert.equal(init.capabilities.textDocumentSync?.change, 2, 'the server does not take incremental changes');
    await conn.sendNotification('initialized', {});

    const uri = 'file:///livekv-vscode-test/shapes.py';
    await conn.sendNotification('textDocument/didOpen', { textDocument: { uri, languageId: 'python', version: 1, text: TEXT } });
    // the status bar asks for stats once the editor shows the file; the reply comes after the
    // first encode (it queues behind it), so the keys below are edits of an encoded cache
    const opened = await conn.sendRequest(STATS, statsParams(uri)) as DocStats;
    assert.match(statusText(opened).text, /^livekv \d+ tok$/);

    let version = 1;
    let cancelled: Promise<unknown> | undefined;
    for (const [i, k] of keys.entries()) {
      const at = { line: k.line, character: k.character };
      await conn.sendNotification('textDocument/didChange', {
        textDocument: { uri, version: ++version },
        contentChanges: [{ range: { start: at, end: at }, rangeLength: 0, text: k.key }],
      });
      if (i === 8) {
        // VS Code asks after a key, then cancels when the next one comes: $/cancelRequest
        const source = new CancellationTokenSource();
        cancelled = conn.sendRequest(INLINE_COMPLETION, inlineCompletionParams(uri, k.cursor), source.token)
          .then((r) => r, (e) => e);
        setImmediate(() => source.cancel());
      }
    }
    const settled = await cancelled;
    // a cancelled request settles: RequestCancelled, or an empty list when the edit came first
    assert.ok(
      settled instanceof ResponseError ? settled.code === -32800 : Array.isArray((settled as { items?: unknown }).items),
      `unexpected reply to a cancelled request: ${settled}`);

    const got = suggestions(await conn.sendRequest<InlineCompletionList | null>(
      INLINE_COMPLETION, inlineCompletionParams(uri, cursor)));

    const stats = await conn.sendRequest(STATS, statsParams(uri)) as DocStats & { text_sha256: string; lsp_version: number };
    assert.equal(stats.text_sha256, sha(text), 'the server\'s text differs from the one typed');
    assert.equal(stats.lsp_version, version);
    const tokens = stats.tokens ?? 0;
    // a key re-encodes a few tokens at most, never the file
    assert.ok(tokens > 100 && (stats.tokens_encoded_last_edit ?? tokens) < tokens / 4, JSON.stringify(stats));
    const status = statusText(stats);
    assert.match(status.text, new RegExp(`^livekv ${stats.tokens_encoded_last_edit} tok · [0-9.]+ ms$`));
    assert.match(status.tooltip, new RegExp(`a full re-encode: ${tokens}\\b`));

    assert.equal(await conn.sendRequest('shutdown'), null);
    await conn.sendNotification('exit');
    assert.equal(await exited, 0, 'the server did not exit cleanly after shutdown + exit');
    assert.deepEqual(errors, []);

    const want = await engine;
    assert.notEqual(want, '', 'pick a cursor where the model completes something');
    assert.deepEqual(got.map((s) => s.text), [want]);
    assert.deepEqual(got[0].range, { start: cursor, end: cursor });
  } catch (e) {
    (e as Error).message += `\n--- livekv lsp stderr (tail) ---\n${stderr().slice(-4000)}`;
    throw e;
  } finally {
    conn.dispose();
    proc.kill();
  }
});
