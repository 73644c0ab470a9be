"""The llama-server peer benchmark's pieces that do not need llama-server: parsing its recorded
answers, the cursor plans, the summary table, and the error when it is not built."""
import json
from pathlib import Path

import pytest

from livekv.bench import llama_server as LS
from livekv.bench import peer
from livekv.bench.hunks import apply_edits
from livekv.incremental.lines import split_lines

RECORDED = json.loads((Path(__file__).parent / "data" / "llama_server_completions.json").read_text())


def test_parse_recorded_answers():
    cold, warm = (LS.parse(r) for r in RECORDED)
    assert cold.text == warm.text == " a + b"
    assert (cold.evaluated, cold.cached) == (9, 0)
    assert (warm.evaluated, warm.cached) == (1, 8)  # the second ask reused the cached prompt
    for a, r in ((cold, RECORDED[0]), (warm, RECORDED[1])):
        t = r["timings"]
        assert a.first_token_ms == t["prompt_ms"]
        assert a.total_ms == pytest.approx(t["prompt_ms"] + t["predicted_ms"])
        assert a.decode_ms_per_token == pytest.approx(t["predicted_per_token_ms"])


def test_parse_refuses_what_is_not_a_completion():
    with pytest.raises(ValueError, match="timings"):
        LS.parse({"error": {"code": 400, "message": "bad request"}})


def test_missing_server_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGML_AMX_INT8=OFF"):
        LS.find(str(tmp_path / "llama-server"))
    assert peer.main(["--llama-server", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("mode", ["after", "below"])
def test_cursor_points_follow_the_text(mode):
    text = "".join(f"x{i} = {i}\n" for i in range(40))
    for edit, line in peer.cursor_points(text, mode, 3):
        text = apply_edits(text, [edit])
        lines = split_lines(text)
        assert 0 < line < len(lines)
        if mode == "after":  # the inserted line is the one just above the cursor
            assert lines[line - 1] == edit["text"]
        else:
            assert lines[0].startswith("import module_")


def test_summary_table_and_plot(tmp_path):
    recs = [dict(system=s, format="Q8_0", threads=1, mode="after", length=1024, tokens=1030, evaluated=e,
                 first_token_ms=f, total_ms=2 * f, decode_ms_per_token=d)
            for s, e, f, d in [("livekv", 12, 40.0, 20.0), ("livekv", 14, 60.0, None),
                               ("llama-server", 300, 900.0, 15.0), ("llama-server", 310, 1000.0, 16.0)]]
    summary = peer.summarize(recs)
    assert [(s["system"], s["edits"]) for s in summary] == [("livekv", 2), ("llama-server", 2)]
    lk, ls = summary
    assert (lk["evaluated_p50"], lk["first_token_ms_p90"], lk["decode_ms_per_token_p50"]) == (14, 60.0, 20.0)
    assert (ls["evaluated_p50"], ls["total_ms_p50"]) == (310, 2000.0)
    rows = peer.table(summary).splitlines()
    assert len(rows) == 4 and "| after | 1,030 | 1 | livekv | Q8_0 | 14 / 14 | 60 / 60 | 120 / 120 | 20 |" in rows
    peer.plot(summary, tmp_path / "peer.png")
    assert (tmp_path / "peer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_model_llama_server_cannot_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF"):
        peer.gguf_of(str(tmp_path / "model.safetensors"))
    assert peer.gguf_of(None).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_trained_context_is_read_from_the_gguf(tmp_path):
    """llama-server caps a slot at it: the benchmark lifts the cap past SmolLM2's 8,192 (16k rows)."""
    assert LS.train_context(peer.gguf_of(None)) == ("llama", 8192)
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")  # no context length written
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert LS.train_context(tmp_path / "bare.gguf") is None


def test_a_refusal_says_what_llama_server_said():
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = b'{"error":{"code":400,"message":"request (16347 tokens) exceeds the available context size"}}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        s = object.__new__(LS.LlamaServer)  # a peer already up: only its port
        s.port = httpd.server_address[1]
        with pytest.raises(RuntimeError, match="400 to /completion.*exceeds the available context size"):
            s.complete("x", 1, ["\n"])
    finally:
        httpd.shutdown()
