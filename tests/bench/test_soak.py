"""bench.soak: its report's arithmetic, and a few seconds of it end to end against our server on a
tiny model (the server stopped, workers included, when it returns)."""
import json

import pytest

from bench.soak import (KINDS, OPEN_GAUGE, Rec, gaps_report, main, open_requests, oversize_body,
                        requests_report, resources_report)
from tests.dovetail.server.conftest import CHAT_TEMPLATE
from tests.helpers import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(180)


def test_gaps_while_a_long_prompt_prefills():
    long = Rec("long_stream", "long", t0=10.0, t_end=30.0, status=200, result="200", tokens=[25.0, 26.0], done=True)
    calm = Rec("short_stream", "short0", t0=0.0, t_end=5.0, status=200, result="200", tokens=[1.0, 1.5, 2.0],
               done=True)
    starved = Rec("short_stream", "short1", t0=9.0, t_end=20.0, status=200, result="200", tokens=[9.5, 10.0],
                  keepalives=3, stream_error="server_error/internal_error")  # dies at 20 s: 10 s of silence
    g = gaps_report([long, calm, starved])
    assert g["prefill_windows"] == 1 and g["prefill_max_s"] == 15.0
    assert g["gaps"] == 4 and g["gaps_during_prefill"] == 1
    assert g["worst_gap_during_prefill_s"] == 10.0 and g["worst_gap_during_prefill"]["lane"] == "short1"
    assert g["worst_ttft_s"] == 1.0 and g["worst_ttft_during_prefill_s"] is None
    assert g["keepalive_comments"] == 3


def test_requests_are_counted_by_result_kind_and_500s():
    recs = [Rec("short_stream", "s", 0, 1, 200, "200", done=True),
            Rec("short_stream", "s", 0, 1, 200, "200", stream_error="server_error/internal_error"),
            Rec("short_nonstream", "s", 0, 1, 500, "500"),
            Rec("short_disconnect_mid", "s", 0, 1, 200, "disconnected", tokens=[0.5]),
            Rec("oversize", "abuse", 0, 1, 413, "413", error_code="payload_too_large"),
            Rec("wrong_content_type", "abuse", 0, 1, 200, "200"),
            Rec("long_stream", "long", 0, 1, None, "error:ReadTimeout")]
    r = requests_report(recs)
    assert (r["total"], r["served"], r["refused"], r["disconnected"], r["failed"]) == (7, 2, 2, 1, 2)
    assert r["http_500"] == 1 and r["in_stream_500"] == 1 and r["errors_500"] == 2
    assert r["by_result"]["200"] == 3 and r["by_http_status"]["200"] == 4
    k = r["by_kind"]
    assert set(k) == set(KINDS)
    assert k["oversize"]["as_expected"] == 1 and k["oversize"]["error_codes"] == {"payload_too_large": 1}
    assert k["wrong_content_type"]["as_expected"] == 0 and k["wrong_content_type"]["served"] == 1
    assert k["short_disconnect_mid"]["left_before_first_token"] == 0


def test_metrics_gauge_rss_growth_and_the_oversize_body():
    text = ("# HELP dovetail:worker_open_requests ...\n# TYPE dovetail:worker_open_requests gauge\n"
            'dovetail:worker_open_requests{worker="target"} 0.0\ndovetail:worker_open_requests{worker="draft"} 2.0\n'
            "dovetail:num_requests_running 1.0\n")
    assert open_requests(text) == (OPEN_GAUGE, {"target": 0, "draft": 2})
    assert open_requests("other_open_requests 3\n") == ("other_open_requests", {"all": 3})
    samples = [{"t": t, "rss_mb": rss, "fds": 10, "procs": {"server": {"rss_mb": rss, "fds": 10}}}
               for t, rss in ((0, 50), (60, 100), (61, 100), (119, 104), (120, 104), (130, 90))]
    res = resources_report(samples, warmup=60, window=5, t_load_end=120)
    assert (res["baseline_rss_mb"], res["final_rss_mb"], res["rss_growth_pct"]) == (100, 104, 4.0)
    assert res["peak_rss_mb"] == 104 and res["idle_rss_mb"] == 90
    body = oversize_body(2)
    assert len(body) == 2_000_000 and json.loads(body)["messages"][0]["role"] == "user"


@pytest.fixture(scope="module")
def chat_target(tmp_path_factory):
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("soak-model")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    make_tiny_tokenizer(target)
    tok = AutoTokenizer.from_pretrained(str(target))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(target))
    return target


def test_a_short_soak_counts_every_kind_of_request_and_stops_the_server(chat_target, tmp_path, pids):
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": c}]}) + "\n"
                               for c in ("def f(x):", "x = [1, 2", "import os", "print('hi')")))
    long_text = tmp_path / "long.txt"
    long_text.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(40)))
    rc = main(["--target", str(chat_target), "--no-draft", "--serve-args", "--dtype float64",
               "--duration", "8", "--warmup", "2", "--concurrency", "2", "--seed", "3", "--max-tokens", "8",
               "--prompts-file", str(prompts), "--long-tokens", "300", "--long-text-file", str(long_text),
               "--long-pause", "0.3", "--abuse-interval", "0.2", "--oversize-mb", "0.5",
               "--sample-interval", "0.25", "--drain", "30", "--settle", "30", "--warn-only",
               "--out", str(tmp_path / "results"), "--name", "t"])
    out = tmp_path / "results" / "t"
    report = json.loads((out / "soak.json").read_text())
    # the server and its worker are gone
    server = report["server"]
    seen = {int(pid): role for pid, role in server["pids_seen"].items()}
    assert seen.get(server["pid"]) == "server" and "target" in seen.values(), seen
    left = pids.wait_gone(list(seen))
    for pid in left:
        pids.kill(pid)
    assert not left, f"still running after the soak: {left}"
    assert server["exit_code"] == 0 and server["alive_after_load"]
    assert rc == 0  # --warn-only

    assert {"args", "requests", "gaps", "resources", "metrics_end", "checks", "passed", "samples"} <= set(report)
    assert set(report["checks"]) == {"no_500s", "no_open_requests_at_end", "rss_growth_below_limit", "server_alive"}
    req = report["requests"]
    assert set(req["by_kind"]) == set(KINDS)
    for kind, k in req["by_kind"].items():
        assert k["sent"] >= 1, f"no {kind} request was sent"
        assert sum(k["by_result"].values()) == k["sent"], (kind, k)
        assert k["served"] + k["refused"] + k["disconnected"] + k["failed"] + k["cut_at_end"] == k["sent"]
    assert req["total"] == sum(k["sent"] for k in req["by_kind"].values())
    k = req["by_kind"]
    for kind in ("short_stream", "short_nonstream", "long_stream", "long_nonstream"):
        assert k[kind]["served"] >= 1, (kind, k[kind])
    assert k["short_disconnect_early"]["disconnected"] >= 1 and k["short_disconnect_mid"]["disconnected"] >= 1
    assert k["bad_key"]["by_result"] == {"401": k["bad_key"]["sent"]}
    assert k["no_key"]["by_result"] == {"401": k["no_key"]["sent"]}
    assert k["bad_json"]["by_result"] == {"400": k["bad_json"]["sent"]}
    assert set(k["oversize"]["by_result"]) <= {"400", "413"}  # 413 by a body limit; 400 past the context
    assert set(k["wrong_content_type"]["by_result"]) <= {"200", "415"}  # 415 once JSON routes require JSON
    assert req["errors_500"] == 0, req["by_result"]

    gaps = report["gaps"]
    assert gaps["short_streams"] >= 1 and gaps["gaps"] >= 1 and gaps["prefill_windows"] >= 3
    assert gaps["worst_gap_s"] is not None and gaps["worst_gap_s"] >= gaps["gap_p50_s"]
    assert report["long_prompt_tokens"] >= 300
    res = report["resources"]
    assert res["samples"] >= 10 and res["baseline_rss_mb"] > 0 and res["rss_growth_pct"] is not None
    assert {"server", "target"} <= set(res["by_process"]) and res["peak_fds"] > 0
    end = report["metrics_end"]
    assert end["gauge"] == OPEN_GAUGE and end["open_requests"] == 0, end
    assert (out / "soak.png").stat().st_size > 0 and (out / "server.log").exists()
