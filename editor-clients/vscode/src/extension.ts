// livekv for VS Code: starts `livekv lsp` over stdio and shows its suggestions as ghost text.
// The requests themselves are built in requests.ts (shared with the node test).
import * as vscode from 'vscode';
import {
  CancellationToken, DidChangeConfigurationNotification, InlineCompletionItem, InlineCompletionList, LanguageClient, LanguageClientOptions, ServerOptions,
  TransportKind,
} from 'vscode-languageclient/node';
import {
  INLINE_COMPLETION, STATS, DocStats, Settings, inlineCompletionParams, readSettings, serverCommand,
  serverSettings, statsParams, statusText, suggestions,
} from './requests';

const SELECTOR = [{ scheme: 'file', language: 'python' }, { scheme: 'untitled', language: 'python' }];
// the server's "ask me again" for a document whose completion it had to answer empty (the model
// was loading, the file still encoding): docs/protocol.md
const REFRESH = 'livekv/refresh';

let client: LanguageClient | undefined;
let status: vscode.StatusBarItem;
let statsTimer: NodeJS.Timeout | undefined;
let statsInFlight = false;
let askedBeforeStart: vscode.TextDocument | undefined;  // a suggestion wanted while the server started

function settings(): Settings {
  const cfg = vscode.workspace.getConfiguration('livekv');
  return readSettings((key) => cfg.get(key));
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function provideInline(document: vscode.TextDocument, position: vscode.Position,
                             context: vscode.InlineCompletionContext, token: CancellationToken) {
  const c = client;
  if (!c || !c.isRunning()) {
    askedBeforeStart = document;  // asked again once the server runs (start)
    return null;
  }
  // typing cancels the token: wait out a burst of keys before the model starts on one
  await sleep(settings().debounceMs);
  if (token.isCancellationRequested) {
    return null;
  }
  const params = inlineCompletionParams(c.code2ProtocolConverter.asUri(document.uri), position, context.triggerKind);
  try {
    // the token sends $/cancelRequest when VS Code gives up on this position
    const result = await c.sendRequest<InlineCompletionList | InlineCompletionItem[] | null>(
      INLINE_COMPLETION, params, token);
    if (token.isCancellationRequested) {
      return null;
    }
    return suggestions(result).map((s) => new vscode.InlineCompletionItem(
      s.text, s.range ? c.protocol2CodeConverter.asRange(s.range) : new vscode.Range(position, position)));
  } catch {
    return null;  // cancelled, or the server is restarting: no ghost text this time
  } finally {
    refreshStatusSoon(document, 0);
  }
}

/** Ask livekv/stats for the active document after the edits settle; one request at a time. */
function refreshStatusSoon(document?: vscode.TextDocument, delay = 400) {
  clearTimeout(statsTimer);
  statsTimer = setTimeout(async () => {
    const doc = vscode.window.activeTextEditor?.document;
    const c = client;
    if (!doc || (document && doc !== document) || !c?.isRunning() || statsInFlight ||
        !vscode.languages.match(SELECTOR, doc)) {
      return;
    }
    statsInFlight = true;
    try {
      const s = await c.sendRequest<DocStats>(STATS, statsParams(c.code2ProtocolConverter.asUri(doc.uri)));
      const { text, tooltip } = statusText(s);
      status.text = `$(pulse) ${text}`;
      status.tooltip = tooltip;
    } catch {
      // the document is not open on the server yet (or any more): keep the last figures
    } finally {
      statsInFlight = false;
    }
  }, delay);
}

function createClient(s: Settings): LanguageClient {
  const { command, args } = serverCommand(s);
  const server: ServerOptions = { command, args, transport: TransportKind.stdio };
  const options: LanguageClientOptions = {
    documentSelector: SELECTOR,
    initializationOptions: serverSettings(s),
    outputChannelName: 'livekv',
    middleware: {
      // ghost text goes through our provider (requests.ts), not the client's built-in one
      provideInlineCompletionItems: (document, position, context, token) =>
        provideInline(document, position, context, token),
      // the server also answers textDocument/completion (for editors without inline completion);
      // here it would only put a second, slower copy of the ghost text in the suggest widget
      provideCompletionItem: () => null,
    },
  };
  const c = new LanguageClient('livekv', 'livekv', server, options);
  c.onNotification(REFRESH, (params: { uri?: string }) => askAgain(params?.uri));
  return c;
}

/** Ask VS Code for the inline suggestion again, if the person is still in that document: the
 * request it made earlier got nothing (no client yet, or an empty answer), and it would not ask
 * again before the next keystroke. */
function askAgain(uri: string | undefined) {
  const editor = vscode.window.activeTextEditor;
  const c = client;
  if (uri && editor && c && c.code2ProtocolConverter.asUri(editor.document.uri) === uri) {
    void vscode.commands.executeCommand('editor.action.inlineSuggest.trigger');
  }
}

async function start() {
  const s = settings();
  client = createClient(s);
  status.text = '$(sync~spin) livekv';
  status.tooltip = `livekv: starting ${serverCommand(s).command} lsp`;
  try {
    await client.start();
    const asked = askedBeforeStart;
    askedBeforeStart = undefined;
    if (asked && !asked.isClosed) {
      askAgain(client.code2ProtocolConverter.asUri(asked.uri));
    }
    status.text = '$(pulse) livekv';
    status.tooltip = 'livekv: ready (the last edit\'s cost shows here after an edit)';
    refreshStatusSoon(undefined, 0);
  } catch (e) {
    status.text = '$(error) livekv';
    status.tooltip = `livekv: could not start: ${e}`;
    void vscode.window.showErrorMessage(
      `livekv: could not start "${serverCommand(s).command} lsp" (${e}). ` +
      'Install livekv (pip install -e . in its repo) or set livekv.serverPath to its `livekv` executable.');
  }
}

async function stop() {
  const c = client;
  client = undefined;
  if (c) {
    await c.stop().catch(() => undefined);
  }
}

export async function activate(context: vscode.ExtensionContext) {
  status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.name = 'livekv';
  status.show();
  context.subscriptions.push(
    status,
    vscode.commands.registerCommand('livekv.restart', async () => { await stop(); await start(); }),
    vscode.workspace.onDidChangeTextDocument((e) => refreshStatusSoon(e.document)),
    vscode.window.onDidChangeActiveTextEditor(() => refreshStatusSoon(undefined, 0)),
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (!e.affectsConfiguration('livekv') || !client) {
        return;
      }
      if (e.affectsConfiguration('livekv.serverPath')) {
        await stop();
        await start();
      } else {
        // the server reloads the model or re-opens documents as needed
        await client.sendNotification(DidChangeConfigurationNotification.type, { settings: serverSettings(settings()) });
      }
    }),
    { dispose: () => { clearTimeout(statsTimer); } },
  );
  await start();
}

export function deactivate() {
  return stop();
}
