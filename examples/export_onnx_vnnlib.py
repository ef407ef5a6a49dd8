"""Export a model and a property for other verifiers: ONNX + VNN-LIB, as in VNN-COMP.

    python examples/export_onnx_vnnlib.py [OUT]

Trains a small digits MLP, then writes a VNN-COMP benchmark folder for classification robustness
at eps = 0.02 on the first test images (`propdsl export` does the same for a run folder):

    OUT/onnx/f.onnx             the network, input [1, 1, 8, 8], output [1, 10]
    OUT/vnnlib/robust_I.vnnlib  the property on test image I, in VNN-LIB 1.0
    OUT/instances.csv           onnx file, vnnlib file, timeout: one line per instance

and the same queries in VNN-LIB 2.0 under OUT/vnnlib2. A VNN-LIB file states the *negation* of
the property: a point satisfying its assertions is a counterexample, so a verifier's `unsat`
proves the property for that image. The script reads the 1.0 files back and checks that their
input box is the eps-ball clipped to [0, 1], that spec.verify's counterexamples satisfy their
assertions, and (when onnxruntime is installed) that the ONNX network computes the torch outputs.
Without OUT it writes to a temporary folder. About 4 s on a CPU.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.export import export
from propdsl.models import build_model

SPEC = Path(__file__).resolve().parent.parent / "specs" / "classification_robustness.prop"
EPS = 0.02


def read_vnnlib(path: Path, inputs: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """The input box and the output disjunction `(<= Y_a Y_b)` of a VNN-LIB 1.0 file written
    for classification robustness (the only output atoms it needs)."""
    text = path.read_text(encoding="utf-8")
    lo, hi = torch.full((inputs,), -torch.inf), torch.full((inputs,), torch.inf)
    for op, i, value in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-0-9.]+)\)\)", text):
        (hi if op == "<=" else lo)[int(i)] = float(value)
    atoms = [(int(a), int(b)) for a, b in re.findall(r"\(and \(<= Y_(\d+) Y_(\d+)\)\)", text)]
    return lo, hi, atoms


def main(out: Path, samples: int = 8, seed: int = 0) -> None:
    torch.manual_seed(seed)
    train = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    model = build_model("mlp", train.input_shape, train.num_classes, hidden=[32], seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(train.x), train.y).backward()
        optimizer.step()
    model.eval()

    spec = propdsl.load(SPEC, params={"eps": EPS})
    report = export(spec, model, test.x, test.y, out, properties=["robust"])
    export(spec, model, test.x, test.y, out / "vnnlib2", properties=["robust"], fmt="vnnlib2")
    print(f"network: {report.onnx}")
    print(f"{len(report.files)} VNN-LIB 1.0 files in {out / 'vnnlib'}, 2.0 in {out / 'vnnlib2'}")
    print("instances.csv:", report.instances.read_text(encoding="utf-8").splitlines()[0], "...")

    # The files read back: the input box is the ball clipped to the pixel range.
    x = test.x.flatten(1)
    worst = 0.0
    for i, path in enumerate(report.files):
        lo, hi, atoms = read_vnnlib(path, x.shape[1])
        expect_lo, expect_hi = (x[i] - EPS).clamp(0, 1), (x[i] + EPS).clamp(0, 1)
        worst = max(worst, (lo - expect_lo).abs().max().item(), (hi - expect_hi).abs().max().item())
        assert len(atoms) == 9 and all(a == int(test.y[i]) for a, _ in atoms)
    print(f"input boxes = the eps-balls clipped to [0, 1], within {worst:.1e}")

    # A counterexample that spec.verify found satisfies the file's assertions.
    verdicts = spec.verify(model, test.x, test.y, ["robust"], method="crown")["robust"]
    print("spec.verify:", ", ".join(f"{i}: {s}" for i, s in enumerate(verdicts.status)))
    for i, status in enumerate(verdicts.status):
        if status == "falsified":
            lo, hi, atoms = read_vnnlib(report.files[i], x.shape[1])
            point = verdicts.counterexamples["x'"][i : i + 1]
            logits = model(point)[0]
            in_box = bool(((point.flatten() >= lo - 1e-7) & (point.flatten() <= hi + 1e-7)).all())
            holds = any(logits[a] <= logits[b] for a, b in atoms)
            print(
                f"image {i}: its counterexample is in the box {in_box}, meets an assertion {holds}"
            )

    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: skipped running the ONNX network")
        return
    session = onnxruntime.InferenceSession(str(report.onnx), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diff = max(
            abs(
                session.run(None, {"input": test.x[i : i + 1].numpy()})[0]
                - model(test.x[i : i + 1]).numpy()
            ).max()
            for i in range(len(test.x))
        )
    print(f"onnxruntime against torch: largest difference {diff:.1e}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
