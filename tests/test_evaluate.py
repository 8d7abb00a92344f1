"""`imcap eval` end to end: its numbers equal pycocoevalcap's scorers called directly on the same data."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from imcap.cli import app

from .conftest import make_shared_subset

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


@requires_java
def test_eval_numbers_equal_direct_pycocoevalcap(flickr8k, tmp_path, capfd):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = make_shared_subset(flickr8k, tmp_path / "data", n_train=1, n_val=6)
    out, captions = tmp_path / "scores.json", tmp_path / "captions.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data",
            str(data),
            "--split",
            "val",
            "--beams",
            "2",
            "--json",
            str(out),
            "--predictions",
            str(captions),
        ],
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^CIDEr-D +\d\.\d{4}$", result.stdout, re.MULTILINE)  # as the README names it
    assert "PTBTokenizer" not in capfd.readouterr().err  # Java's progress chatter stays off the terminal
    reported = json.loads(out.read_text())
    predictions = json.loads(captions.read_text())
    assert reported["n_images"] == 6 and reported["settings"]["num_beams"] == 2

    # references read independently of imcap.data, straight from the TSV
    references = {}
    for row in (data / "captions.tsv").read_text().splitlines():
        name, _, text = row.split("\t")
        references.setdefault(name, []).append(text)
    refs = {k: [{"caption": c} for c in references[k.rsplit("/", 1)[-1]]] for k in predictions}
    preds = {k: [{"caption": v}] for k, v in predictions.items()}
    tokenizer = PTBTokenizer()
    refs, preds = tokenizer.tokenize(refs), tokenizer.tokenize(preds)
    bleu, _ = Bleu(4).compute_score(refs, preds)
    expected = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    expected["METEOR"], _ = Meteor().compute_score(refs, preds)
    expected["ROUGE-L"], _ = Rouge().compute_score(refs, preds)
    expected["CIDEr"], _ = Cider().compute_score(refs, preds)
    for name, value in expected.items():
        assert reported[name] == pytest.approx(value, abs=1e-9), name
    assert 1 <= reported["distinct_captions"] <= 6


def test_eval_reports_an_unknown_split_in_one_line(flickr8k, tmp_path):
    data = make_shared_subset(flickr8k, tmp_path / "data", n_train=1, n_val=2)
    result = CliRunner().invoke(app, ["eval", "--data", str(data), "--split", "test"])
    assert result.exit_code == 2
    assert "test" in result.output and len(result.output.strip().splitlines()) == 1
