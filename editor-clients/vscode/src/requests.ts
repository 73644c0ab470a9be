// Everything the extension sends to `livekv lsp` and reads back, without `vscode`: the extension
// and the node test (which talks to the real server, outside VS Code) share this module, so the
// test exercises the exact settings, requests and status text the extension uses.
import type {
  InlineCompletionItem, InlineCompletionList, InlineCompletionParams, Position, Range,
} from 'vscode-languageserver-protocol';

export const INLINE_COMPLETION = 'textDocument/inlineCompletion';
export const STATS = 'livekv/stats';

// The server refuses every initializationOption when one key under "livekv" is unknown to it
// (SETTINGS in lsp_server/protocol.py), so only keys it accepts are ever sent, never a
// pass-through of whatever livekv.* holds. model, strategy and maxNewTokens always go; the
// optional ones only when set (null: the server's own default), so an older server that lacks
// one still starts for everyone who left it alone.
export const STRATEGIES = ['full', 'prefix', 'reuse', 'conflict', 'pie', 'pie-window', 'pie-refresh', 'pie-blend', 'lazy'] as const;
export const OPTIONAL = {
  device: 'string', dtype: 'string', precision: 'string', maxPromptMs: 'integer', maxPredictMs: 'integer', maxLines: 'integer',
  multiline: 'boolean', prefetch: 'boolean', candidates: 'integer', repoContext: 'boolean', maxCacheTokens: 'integer',
} as const;
type Optional = { [K in keyof typeof OPTIONAL]?: (typeof OPTIONAL)[K] extends 'string' ? string
  : (typeof OPTIONAL)[K] extends 'boolean' ? boolean : number };

export interface Settings {
  serverPath: string;
  model: string;          // '' (or null): the embedded SmolLM2-135M
  strategy: string;
  maxNewTokens: number;
  debounceMs: number;
  optional: Optional;     // only the ones set
}

export const DEFAULTS: Settings = {
  serverPath: 'livekv', model: '', strategy: 'pie', maxNewTokens: 48, debounceMs: 75, optional: {},
};

const is = {
  string: (v: unknown) => typeof v === 'string',
  boolean: (v: unknown) => typeof v === 'boolean',
  integer: (v: unknown) => Number.isInteger(v) && (v as number) >= 0,
};

/** Settings read through `get` (VS Code's WorkspaceConfiguration.get, or a plain object's);
 * values of the wrong type fall back to the defaults. */
export function readSettings(get: (key: string) => unknown): Settings {
  const pick = <K extends keyof Settings>(key: K, ok: (v: unknown) => boolean): Settings[K] => {
    const v = get(key);
    return (v !== undefined && v !== null && ok(v) ? v : DEFAULTS[key]) as Settings[K];
  };
  const optional: Record<string, unknown> = {};
  for (const [key, type] of Object.entries(OPTIONAL)) {
    const v = get(key);
    if (v !== undefined && v !== null && is[type](v)) {
      optional[key] = v;
    }
  }
  return {
    serverPath: pick('serverPath', (v) => is.string(v) && (v as string).trim() !== ''),
    model: pick('model', is.string),
    strategy: pick('strategy', (v) => (STRATEGIES as readonly unknown[]).includes(v)),
    maxNewTokens: pick('maxNewTokens', (v) => is.integer(v) && (v as number) >= 1),
    debounceMs: pick('debounceMs', is.integer),
    optional: optional as Optional,
  };
}

/** The server's part of the settings, as initializationOptions and didChangeConfiguration
 * send it. model null: the embedded model (so clearing the setting goes back to it). */
export function serverSettings(s: Settings): { livekv: Record<string, unknown> } {
  return {
    livekv: { model: s.model.trim() || null, strategy: s.strategy, maxNewTokens: s.maxNewTokens, ...s.optional },
  };
}

/** How to start the server: `<serverPath> lsp` over stdio ("~/" expanded). */
export function serverCommand(s: Settings, home = process.env.HOME ?? ''): { command: string; args: string[] } {
  const path = s.serverPath.trim();
  return { command: path.startsWith('~/') && home ? home + path.slice(1) : path, args: ['lsp'] };
}

/** LSP's trigger kinds are VS Code's plus one (Invoked 1, Automatic 2 vs Invoke 0, Automatic 1). */
export function inlineCompletionParams(uri: string, position: Position, vscodeTriggerKind = 1): InlineCompletionParams {
  return {
    textDocument: { uri },
    position: { line: position.line, character: position.character },
    context: { triggerKind: vscodeTriggerKind === 0 ? 1 : 2 },
  };
}

export interface Suggestion { text: string; range?: Range }

/** The suggestions in an inlineCompletion reply (a list, bare items, or null), empty ones dropped. */
export function suggestions(result: InlineCompletionList | InlineCompletionItem[] | null | undefined): Suggestion[] {
  const items = Array.isArray(result) ? result : result?.items ?? [];
  return items
    .map((i) => ({ text: typeof i.insertText === 'string' ? i.insertText : i.insertText.value, range: i.range }))
    .filter((s) => s.text !== '');
}

export function statsParams(uri: string): { textDocument: { uri: string } } {
  return { textDocument: { uri } };
}

/** The fields of a `livekv/stats` reply the status bar reads (the reply has more). */
export interface DocStats {
  tokens?: number;
  tokens_encoded_last_edit?: number;
  keys_rotated_last_edit?: number;
  edit_ms_last?: number;
  stale_tokens?: number;
  full_reencode_tokens?: number;
  strategy?: string;
  model?: string;
  edits?: number;
  last_completion?: { ttft_ms?: number; total_ms?: number; steps?: number; stop?: string };
}

const ms = (x: number | undefined) => (x === undefined ? '?' : x < 10 ? x.toFixed(1) : Math.round(x).toString());

/** Status bar text and tooltip: what the last edit cost, next to what a full re-encode would. */
export function statusText(s: DocStats): { text: string; tooltip: string } {
  const encoded = s.tokens_encoded_last_edit ?? 0;
  const lines = [
    `livekv ${s.model ?? ''} (${s.strategy ?? '?'}), ${s.tokens ?? '?'} tokens cached`,
    s.edits
      ? `last edit: ${encoded} tokens encoded (a full re-encode: ${s.full_reencode_tokens ?? s.tokens ?? '?'}), ` +
        `${s.keys_rotated_last_edit ?? 0} keys rotated, ${ms(s.edit_ms_last)} ms`
      : 'no edit yet',
    `stale tokens: ${s.stale_tokens ?? 0}`,
  ];
  const c = s.last_completion;
  if (c && c.ttft_ms !== undefined) {
    lines.push(`last completion: first token ${ms(c.ttft_ms)} ms, ${ms(c.total_ms)} ms in all, ` +
               `${c.steps ?? '?'} steps, stopped at ${c.stop ?? '?'}`);
  }
  const text = s.edits ? `livekv ${encoded} tok · ${ms(s.edit_ms_last)} ms` : `livekv ${s.tokens ?? '?'} tok`;
  return { text, tooltip: lines.join('\n') };
}
