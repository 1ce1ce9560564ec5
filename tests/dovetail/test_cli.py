"""dovetail-launch end to end on tiny models that carry a character-level tokenizer."""
import io
import sys

import pytest

import dovetail
from dovetail.cli import main
from tests.helpers import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(120)

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    draft = make_tiny_model(root / "draft", seed=1, noise_from=target, noise=0.002)
    other = make_tiny_model(root / "other", seed=2)
    for path in (target, draft):
        make_tiny_tokenizer(path)
    make_tiny_tokenizer(other, chars="zyxwvutsrqponmlkjihgfedcba9876543210 .,:;()=+-*/\n_'\"[]{}<>!?#")
    return target, draft, other


@pytest.fixture(scope="module")
def reference(models):
    with dovetail.launch(models[0], None, dtype="float64") as coord:
        text = coord.generate(PROMPT, max_new_tokens=12).text
    assert len(text) >= 6  # twelve tokens of real characters: the comparisons below mean something
    return text


def run_cli(capsys, *args):
    """dovetail-launch in this process. Tests that need the draft started pass --force-draft: a
    tiny target's measured verify curve could otherwise make it skip the draft."""
    rc = main(["--dtype", "float64", "--draft-gpu", "cpu", "--max-new-tokens", "12", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_prompt_streams_the_target_only_text(models, reference, capsys):
    target, draft, _ = models
    rc, out, err = run_cli(capsys, "--target", target, "--draft", draft, "--force-draft", "--prompt", PROMPT)
    assert rc == 0, err
    assert out.strip("\n") == reference  # text with a draft is the target's own
    assert "tok/s" in err and "accepted per round" in err


def test_prompts_from_stdin_one_per_line(models, reference, capsys, monkeypatch):
    target, draft, _ = models
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n\n{PROMPT}\n"))
    rc, out, err = run_cli(capsys, "--target", target, "--draft", draft, "--force-draft")
    assert rc == 0, err
    assert out.count(reference) == 2  # the blank line is skipped
    assert err.count("tok/s") == 2


def test_no_draft_is_the_baseline(models, reference, capsys):
    rc, out, err = run_cli(capsys, "--target", models[0], "--no-draft", "--prompt", PROMPT)
    assert rc == 0, err
    assert out.strip("\n") == reference
    assert "1.00 accepted per round" in err


def test_a_draft_with_another_tokenizer_is_refused(models, capsys):
    target, _, other = models
    rc, out, err = run_cli(capsys, "--target", target, "--draft", other, "--force-draft", "--prompt", PROMPT)
    assert rc == 1
    assert "tokenizer" in err and "target" in err and "draft" in err
    assert out == ""


def test_the_gate_keeps_the_text_and_needs_automatic_sizing(models, reference, capsys):
    target, draft, _ = models
    rc, out, err = run_cli(capsys, "--target", target, "--draft", draft, "--gate", "--auto-tree", "--depth", "4",
                           "--top-k", "1", "--prompt", PROMPT)
    assert rc == 0, err
    assert out.strip("\n") == reference
    rc, out, err = run_cli(capsys, "--target", target, "--draft", draft, "--gate", "--depth", "4", "--prompt", PROMPT)
    assert rc == 1 and out == ""
    assert "auto_tree" in err


def test_batch_rows_reach_the_target_and_bad_ones_are_refused_first(models, reference, capsys):
    rc, out, err = run_cli(capsys, "--target", models[0], "--no-draft", "--batch-rows", "1", "--prompt", PROMPT)
    assert rc == 0, err
    assert out.strip("\n") == reference
    rc, out, err = run_cli(capsys, "--target", models[0], "--no-draft", "--batch-rows", "0", "--prompt", PROMPT)
    assert rc == 1 and out == ""
    assert "batch_rows must be an int in [1, 512], got 0" in err


def test_prefill_chunk_and_timeouts_reach_the_workers(models, reference, capsys, monkeypatch):
    """--prefill-chunk reaches the target worker (a 1-token chunk gives the same text) and the
    timeouts the coordinator's config."""
    import dovetail.flags as flags
    seen = {}
    real = flags.start_coordinator

    def spy(args, **options):
        coord = real(args, **options)
        seen.update(prefill=coord.config.prefill_timeout_s, verify=coord.config.verify_timeout_s)
        return coord

    monkeypatch.setattr("dovetail.cli.start_coordinator", spy)
    rc, out, err = run_cli(capsys, "--target", models[0], "--no-draft", "--prefill-chunk", "1",
                           "--prefill-timeout", "77", "--verify-timeout", "33", "--prompt", PROMPT)
    assert rc == 0, err
    assert out.strip("\n") == reference
    assert seen == {"prefill": 77.0, "verify": 33.0}


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--target", tmp_path / "nope", "--no-draft", "--prompt", PROMPT)
    assert rc == 1
    assert "nope" in err


def test_target_and_draft_roles_on_two_ports_give_the_same_text(models, reference, capsys, tmp_path):
    """--role target in a process of its own on tcp:// with CurveZMQ, --role draft here: the
    text (tokenizer from the draft, no --target) is the one-host run's. The target serves the
    next coordinator after this one closes, and exits cleanly on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess

    from dovetail.system.security import write_keys
    target, draft, _ = models
    keys = write_keys(tmp_path / "keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "dovetail.cli", "--role", "target", "--listen", address, "--target", str(target),
         "--dtype", "float64", "--curve-secret", str(keys["worker"]["secret"]),
         "--curve-allow", str(keys["worker"]["allow"])],
        stdin=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        me = keys["coordinator"]
        for _ in range(2):  # one coordinator after another
            rc, out, err = run_cli(capsys, "--role", "draft", "--connect", address, "--draft", draft,
                                   "--force-draft", "--curve-client-secret", me["secret"],
                                   "--curve-server-public", me["server_public"], "--prompt", PROMPT)
            assert rc == 0, err
            assert out.strip("\n") == reference
            assert "tok/s" in err
            assert worker.poll() is None  # the closing coordinator ended its session, not the server
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_output_constraints_and_penalties_from_flags(models, capsys, tmp_path):
    import json
    import re
    target, draft, _ = models
    rc, out, err = run_cli(capsys, "--target", target, "--draft", draft, "--force-draft", "--regex", "[a-f]{3}-[0-9]{2}",
                           "--presence-penalty", "0.5", "--prompt", PROMPT)
    assert rc == 0, err
    assert re.fullmatch(r"[a-f]{3}-[0-9]{2}", out.strip("\n")), out
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}))
    rc, out, err = run_cli(capsys, "--target", target, "--no-draft", "--json-schema", schema, "--prompt", PROMPT)
    assert rc == 0, err
    assert json.loads(out) in ({"ok": True}, {"ok": False})


def test_bad_constraints_are_refused_before_the_models_load(capsys, tmp_path):
    for flags, says in ((["--regex", "("], "regex"), (["--json-schema", "{oops"], "JSON schema"),
                        (["--grammar", tmp_path / "missing.lark"], "missing.lark"),
                        (["--frequency-penalty", "3"], "[-2, 2]")):
        rc, _, err = run_cli(capsys, "--target", tmp_path / "never-loaded", "--no-draft", *flags, "--prompt", PROMPT)
        assert rc == 2 and says in err, (flags, err)
