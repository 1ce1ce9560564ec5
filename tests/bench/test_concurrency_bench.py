"""python -m bench.concurrency on a few tiny requests: it runs each setting and reports them."""
import pytest

from bench.concurrency import main

pytestmark = pytest.mark.timeout(240)


def test_reports_every_active_setting(capsys):
    assert main(["--active", "1,2", "--requests", "3", "--max-new-tokens", "6", "--hidden", "32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "max_active" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"]
    assert all(r.split("|")[2].strip() == "18" for r in rows)  # 3 requests x 6 tokens each time
