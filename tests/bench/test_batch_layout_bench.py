"""python -m bench.batch_layout on a tiny model: a row per shape, both timings and their ratio."""
import pytest

from bench.batch_layout import main
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(120)


def test_reports_every_shape(tmp_path, capsys):
    tiny = make_tiny_model(tmp_path / "t")
    assert main(["--target", str(tiny), "--requests", "1,3", "--rows", "1,2", "--ctx", "12", "--mixed",
                 "--repeats", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "requests" not in line]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("1", "1"), ("1", "2"), ("3", "1"), ("3", "2")]
    for r in rows:
        alone, batched = (float(x.strip().removesuffix(" ms")) for x in r[2:4])
        assert alone > 0 and batched > 0 and r[4].strip().endswith("x")
