"""A user's CSV full of hostile but valid text goes through train -> calibrate -> evaluate (served
as offline in tests/test_cluster.py); a file that cannot be read fails at `dimee train` at once."""

import time

from dimee_models import artifact
from dimee_models.cli import main
from dimee_models.evaluate import run_evaluation
from dimee_models.policy import load_policies
from tests.conftest import HOSTILE_TEXTS


def test_hostile_texts_train_calibrate_and_evaluate(hostile_artifact):
    manifest = artifact.read_manifest(hostile_artifact)
    assert manifest.labels == ["neg", "pos"] and manifest.policy is not None
    stored = [t for part in ("train", "calibration", "test")
              for t in artifact.load_split(hostile_artifact, part, manifest).texts]
    assert len(stored) == 3 * len(HOSTILE_TEXTS) + 15  # the empty CSV row was skipped, no text was split
    assert {t.strip() for t in HOSTILE_TEXTS} <= set(stored)
    doc, _, test = run_evaluation(hostile_artifact)
    assert len(test.labels) == len(artifact.load_split(hostile_artifact, "test", manifest).texts)
    assert doc["n"] == len(test.labels)
    policies, _ = load_policies(hostile_artifact)
    assert set(policies) <= set(doc["methods"])  # every calibrated policy scored on the hostile test split
    for name, method in doc["methods"].items():
        assert 0 <= method["accuracy"] <= 1 and abs(sum(method["tier_fraction"].values()) - 1) < 1e-9, name


def test_unreadable_files_fail_at_train_within_seconds(tmp_path, capsys):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("review,sentiment\ncaf\u00e9 cr\u00e8me,pos\nbad,neg\n".encode("latin-1"))
    missing = tmp_path / "columns.csv"
    missing.write_text("text,label\nfine,pos\nbad,neg\n")
    for dataset, message in ((f"csv:{latin}", "cannot read as UTF-8"), (f"csv:{missing}", "no column 'review'")):
        began = time.monotonic()
        code = main(["train", "--dataset", dataset, "--text-column", "review", "--label-column", "sentiment",
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert time.monotonic() - began < 10
