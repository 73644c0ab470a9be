"use strict";
// The browser demo's editor: a textarea whose every input is one edit, ghost text streamed in at
// the end of a line, and the cost panel. The connection (and its failover) is client.js's.
const $ = (id) => document.getElementById(id);
const ta = $("code"), overlay = $("overlay"), statusEl = $("status");
const MAX_NEW_TOKENS = 24, DEBOUNCE_MS = 200;

let uri = null, synced = "", editNo = 0;
let ghost = null, debounce = null;  // ghost: {id, at, text}, the suggestion at UTF-16 offset `at`

function setStatus(state, text) { statusEl.dataset.state = state; statusEl.textContent = text; }
function logError(text) { $("log").textContent = text; }

// -- positions: JS strings are UTF-16, and so are the protocol's columns ----------------------
function position(text, offset) {
  let line = 0, start = 0;
  for (let i = text.indexOf("\n"); i !== -1 && i < offset; i = text.indexOf("\n", i + 1)) { line++; start = i + 1; }
  return { line, character: offset - start };
}
const isHigh = (c) => c >= 0xd800 && c <= 0xdbff, isLow = (c) => c >= 0xdc00 && c <= 0xdfff;

// The one change that turns a into b (common prefix and suffix kept), never splitting a surrogate pair.
function diff(a, b) {
  const n = Math.min(a.length, b.length);
  let p = 0;
  while (p < n && a.charCodeAt(p) === b.charCodeAt(p)) p++;
  if (p > 0 && isHigh(a.charCodeAt(p - 1))) p--;
  let s = 0;
  while (s < n - p && a.charCodeAt(a.length - 1 - s) === b.charCodeAt(b.length - 1 - s)) s++;
  if (s > 0 && isLow(a.charCodeAt(a.length - s))) s--;
  return { range: { start: position(a, p), end: position(a, a.length - s) }, text: b.slice(p, b.length - s) };
}

// -- drawing: highlighted text with the ghost spliced in ---------------------------------------
const PY = /(#[^\n]*)|("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?)|\b(def|class|return|if|elif|else|for|while|in|not|and|or|is|import|from|as|with|try|except|finally|raise|yield|lambda|pass|break|continue|None|True|False|global|nonlocal|del|assert|async|await)\b|\b(\d+(?:\.\d+)?)\b/g;
const CLS = [null, "com", "str", "kw", "num"];
const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

function render() {
  const text = ta.value, at = ghost && ghost.text ? ghost.at : -1;
  const ghostHtml = at >= 0 ? `<span class="ghost" id="ghost">${esc(ghost.text)}</span>` : "";
  let html = "", last = 0;
  const plain = (a, b) => {   // text[a:b], unhighlighted, with the ghost if it falls inside
    if (at >= a && at < b) return esc(text.slice(a, at)) + ghostHtml + esc(text.slice(at, b));
    return esc(text.slice(a, b));
  };
  for (const m of text.matchAll(PY)) {
    const a = m.index, b = a + m[0].length, cls = CLS[m.slice(1).findIndex((g) => g !== undefined) + 1];
    html += plain(last, a) + `<span class="${cls}">` + plain(a, b) + "</span>";
    last = b;
  }
  html += plain(last, text.length) + (at === text.length ? ghostHtml : "");
  overlay.innerHTML = html + "\n ";  // a last empty line still has height
  syncScroll();
}
function syncScroll() { overlay.style.transform = `translate(${-ta.scrollLeft}px, ${-ta.scrollTop}px)`; }

// -- edits: every input becomes one edit; a running suggestion is stale, so cancel it -----------
function onInput() {
  const text = ta.value;
  if (text === synced || uri === null) return;
  const change = diff(synced, text), n = ++editNo;
  synced = text;
  dropGhost();
  client.edit(uri, change, text, (r) => {
    if (r.type === "ok") showEdit(n, r.stats); else logError(`edit: ${r.code}: ${r.message}`);
  });
  clearTimeout(debounce);
  debounce = setTimeout(requestSuggestion, DEBOUNCE_MS);
}

function dropGhost() {
  if (ghost) {
    if (ghost.streaming) client.cancel(ghost.id);
    ghost = null;
    ta.dataset.streaming = "false";
    render();
  }
}

function requestSuggestion() {
  const at = ta.selectionStart, text = ta.value;
  if (at !== ta.selectionEnd || uri === null || text !== synced) return;
  const eol = text.indexOf("\n", at);
  if (text.slice(at, eol === -1 ? text.length : eol).trim() !== "") return;  // only at the end of a line
  const { line, character } = position(text, at);
  const g = ghost = { id: undefined, at, text: "", streaming: true };
  ta.dataset.streaming = "true";
  g.id = client.complete(uri, line, character, MAX_NEW_TOKENS, (r) => {
    g.streaming = false;
    if (ghost === g) ta.dataset.streaming = "false";
    if (r.type === "error") { logError(`complete: ${r.code}: ${r.message}`); return; }
    if (r.cancelled) return;
    showCompletion(r.stats.last_completion);
    showCost(r.stats);  // an edit queued right before its completion is encoded in that completion's pass
  });
}

function onToken(msg) {
  if (!ghost || ghost.id !== msg.id) return;  // from a suggestion already dropped
  ghost.text += msg.text;
  render();
}

function insert(text) {
  ta.focus();
  // execCommand keeps the browser's undo history; setRangeText is the fallback
  if (!document.execCommand("insertText", false, text)) {
    ta.setRangeText(text, ta.selectionStart, ta.selectionEnd, "end");
    onInput();
  }
}

ta.addEventListener("input", onInput);
ta.addEventListener("scroll", syncScroll);
ta.addEventListener("keydown", (e) => {
  if (e.key === "Tab" && !e.shiftKey) {
    e.preventDefault();
    if (ghost && ghost.text && ta.selectionStart === ghost.at && ta.selectionEnd === ghost.at) {
      const text = ghost.text;
      dropGhost();
      insert(text);
    } else {
      insert("    ");
    }
  } else if (e.key === "Escape") {
    dropGhost();
  }
});
// moving the cursor away from a suggestion drops it
document.addEventListener("selectionchange", () => {
  if (ghost && document.activeElement === ta && (ta.selectionStart !== ghost.at || ta.selectionEnd !== ghost.at)) dropGhost();
});

// -- the cost panel ----------------------------------------------------------------------------
let lastRow = null;  // the history row of the newest edit

function showCost(s) {
  const enc = s.tokens_encoded_last_edit, full = s.full_reencode_tokens;
  $("edit-encoded").textContent = enc;
  $("edit-rotated").textContent = s.keys_rotated_last_edit;
  $("edit-ms").textContent = `${s.edit_ms_last.toFixed(1)} ms`;
  $("full-tokens").textContent = full;
  $("doc-tokens").textContent = s.tokens;
  $("saved").textContent = full ? `${(100 * (1 - enc / full)).toFixed(1)} % of the encoding` : "–";
  $("bar-edit").style.width = `${full ? Math.min(100, 100 * enc / full) : 0}%`;
  if (lastRow) {
    const cells = lastRow.children;
    cells[1].textContent = enc;
    cells[2].textContent = s.keys_rotated_last_edit;
    cells[3].textContent = s.edit_ms_last.toFixed(1);
    cells[4].textContent = full;
  }
}

function showEdit(n, s) {
  const row = lastRow = document.createElement("tr");
  row.innerHTML = "<td></td>".repeat(5);
  row.children[0].textContent = n;
  const body = $("history");
  body.prepend(row);
  while (body.children.length > 10) body.lastChild.remove();
  showCost(s);
}

function showCompletion(c) {
  if (!c) return;
  $("comp-ttft").textContent = `${c.ttft_ms.toFixed(0)} ms`;
  $("comp-total").textContent = `${c.total_ms.toFixed(0)} ms`;
  $("comp-steps").textContent = `${c.steps} / ${c.stop}`;
}

// -- connection --------------------------------------------------------------------------------
const fileName = () => (uri || "").split("/").pop();

function onStatus(state, info) {
  if (state === "refused") {
    setStatus("error", `refused: ${info.message} (open the page as …/#token=YOUR_TOKEN)`);
  } else if (state === "closed") {
    if (statusEl.dataset.state !== "error") setStatus("closed", `disconnected (${info.code}${info.reason ? ": " + info.reason : ""})`);
    ta.disabled = true;
  } else if (state === "reconnecting") {  // typing goes on: the edits wait for the new connection
    setStatus("reconnecting", `connection lost (${info.code}); reconnecting…`);
  } else if (state === "open" && uri !== null) {
    setStatus("ready", `${fileName()}: reconnected; the text is re-sent when the server asks`);
  } else if (state === "reopened") {
    setStatus("ready", `${fileName()}: re-opened on the new connection at version ${info.version}`);
  }
}

const client = new LivekvClient(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`, {
  token: new URLSearchParams(location.hash.slice(1)).get("token"), onStatus, onToken,
  onError: (msg) => logError(`${msg.code}: ${msg.message}`),
});

async function openFile() {
  const file = await (await fetch("/demo-file.json")).json();
  ta.value = file.text;
  synced = ta.value;  // the textarea's own line breaks
  render();
  setStatus("loading", `encoding ${file.uri.split("/").pop()}…`);
  client.open(file.uri, synced, 0, (r) => {
    if (r.type === "error") { setStatus("error", `open: ${r.message}`); return; }
    uri = file.uri;
    ta.disabled = false;
    ta.focus();
    ta.setSelectionRange(0, 0);
    $("full-tokens").textContent = $("doc-tokens").textContent = r.stats.tokens;
    setStatus("ready", `${fileName()}: ${r.stats.tokens} tokens cached`);
  });
}

openFile();
