"""Benchmarks EZKL on one of Veil's small networks, for a side-by-side with Veil's own prover.

Run by Veil's CLI as

    python ezkl_bench.py --model M.json --input I.json --workdir DIR
        [--scale 7] [--logrows K [--lookup-range LO HI]] [--runs 1]

with a Python that has `ezkl` (23.0.5) and `onnx` installed. The model file is Veil's float model
(dense and conv layers with relu / sigmoid / no activation); this script turns it into an ONNX
graph, then runs EZKL's whole pipeline in DIR: settings, compile, setup, witness, prove, verify.

The settings mirror what Veil's circuit proves: the input and the output are public, the weights are
private and only their Poseidon hash is public (`param_visibility="hashed"`), and inputs and weights
are fixed-point numbers with `--scale` fractional bits.

Measured, each as wall seconds of that one EZKL call alone: `setup_s` (keys), `witness_s` (the
quantized forward pass), `prove_s` and `verify_s` (medians over `--runs`). Also: the proof's size
(`proof_file_bytes` for EZKL's JSON proof file, which also holds the proof in hex and the public
instances; `proof_bytes` for the raw proof inside it), the proving step's peak resident memory (each
prove runs in a child process of this script, `--step prove`, so `ru_maxrss` of the children is the
prover's own peak), the circuit's logrows and lookup range, and the network's output as EZKL
computed it next to the float output computed here in plain Python.

With `--logrows` the settings are fixed (lookup range from `--lookup-range`, else EZKL's default
-32768..32768); without it EZKL calibrates the lookup range and logrows on the given input (see
`write_settings`).

The SRS is made locally with `ezkl.gen_srs`: `ezkl.get_srs` downloads a public one, and the machines
this runs on have no internet. A locally made SRS is insecure (its toxic waste is known), which does
not matter for timing: proving and verifying cost the same with any SRS of that size.

stdout gets exactly one JSON object at the end; EZKL's logs and this script's go to stderr.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import ezkl
import onnx
from onnx import TensorProto, helper

OPSET = 13


def log(message: str) -> None:
    print(f"[ezkl_bench] {message}", file=sys.stderr, flush=True)


def claim_stdout():
    """Points fd 1 at stderr, so that nothing EZKL prints can land on stdout, and returns the real
    stdout, where only the final JSON object goes."""
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real_stdout


# ---------------------------------------------------------------------------------------------
# The model: its shapes, ONNX graph and plain-Python float forward pass
# ---------------------------------------------------------------------------------------------


def normalize(model: dict, input_len: int) -> dict:
    """Fills in what Veil's model files may leave implicit: `input_shape` (from the first layer and
    the input's length, square images), and for conv layers `in_channels`, `kernel` and weights as
    [out][in][ky][kx] (Veil writes single-channel kernels as [out][ky][kx])."""
    model = dict(model, layers=[dict(layer) for layer in model["layers"]])
    for layer in model["layers"]:
        if layer["kind"] == "conv":
            if not isinstance(layer["weights"][0][0][0], list):
                layer["weights"] = [[kernel] for kernel in layer["weights"]]
            layer.setdefault("in_channels", len(layer["weights"][0]))
            layer.setdefault("kernel", len(layer["weights"][0][0]))
    if "input_shape" not in model:
        first = model["layers"][0]
        if first["kind"] == "conv":
            side = math.isqrt(input_len // first["in_channels"])
            model["input_shape"] = [first["in_channels"], side, side]
        else:
            model["input_shape"] = [first["inputs"]]
    return model


def flat(values) -> list:
    """Flattens nested lists in row-major order."""
    if isinstance(values, list):
        return [x for v in values for x in flat(v)]
    return [float(values)]


def build_onnx(model: dict, path: str) -> None:
    """Writes the model as an ONNX graph with batch size 1: Gemm for dense layers (weights stay in
    Veil's [outputs][inputs] layout, hence transB=1), Conv (stride 1, no padding) for conv layers,
    Flatten before a dense layer that follows a conv, then Relu / Sigmoid."""
    nodes, initializers = [], []
    current = "input"
    rank = 1 + len(model["input_shape"])
    for i, layer in enumerate(model["layers"]):
        weight, bias, out = f"w{i}", f"b{i}", f"layer{i}"
        if layer["kind"] == "dense":
            if rank > 2:
                nodes.append(helper.make_node("Flatten", [current], [f"flat{i}"], axis=1))
                current, rank = f"flat{i}", 2
            dims = [layer["outputs"], layer["inputs"]]
            nodes.append(helper.make_node("Gemm", [current, weight, bias], [out], transB=1))
        elif layer["kind"] == "conv":
            k = layer["kernel"]
            dims = [layer["out_channels"], layer["in_channels"], k, k]
            nodes.append(
                helper.make_node(
                    "Conv", [current, weight, bias], [out],
                    kernel_shape=[k, k], strides=[1, 1], pads=[0, 0, 0, 0],
                )
            )
        else:
            raise ValueError(f"unsupported layer kind {layer['kind']!r}")
        initializers += [
            helper.make_tensor(weight, TensorProto.FLOAT, dims, flat(layer["weights"])),
            helper.make_tensor(bias, TensorProto.FLOAT, [len(layer["bias"])], flat(layer["bias"])),
        ]
        current = out
        activation = layer.get("activation", "none")
        if activation != "none":
            op = {"relu": "Relu", "sigmoid": "Sigmoid"}[activation]
            nodes.append(helper.make_node(op, [current], [f"{out}_{activation}"]))
            current = f"{out}_{activation}"
    nodes.append(helper.make_node("Identity", [current], ["output"]))

    outputs = model["layers"][-1]["outputs"]
    graph = helper.make_graph(
        nodes,
        model.get("name", "model"),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *model["input_shape"]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, outputs])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8  # what opset 13 needs; newer IR versions are not needed here
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def activate(x: float, activation: str) -> float:
    if activation == "relu":
        return max(0.0, x)
    if activation == "sigmoid":
        return 1.0 / (1.0 + math.exp(-x))
    return x


def float_forward(model: dict, pixels: list) -> list:
    """The model's output in float arithmetic, on flat activations (channel-major for conv maps)."""
    x = list(pixels)
    shape = list(model["input_shape"])
    for layer in model["layers"]:
        act = layer.get("activation", "none")
        if layer["kind"] == "dense":
            x = [
                activate(sum(w * v for w, v in zip(row, x)) + b, act)
                for row, b in zip(layer["weights"], layer["bias"])
            ]
            shape = [len(x)]
        else:  # conv, stride 1, no padding
            channels, height, width = shape
            k = layer["kernel"]
            oh, ow = height - k + 1, width - k + 1
            def pixel(c, y, xx):
                return x[(c * height + y) * width + xx]

            out = []
            for kernels, bias in zip(layer["weights"], layer["bias"]):
                for y in range(oh):
                    for xx in range(ow):
                        total = bias + sum(
                            kernels[c][ky][kx] * pixel(c, y + ky, xx + kx)
                            for c in range(channels)
                            for ky in range(k)
                            for kx in range(k)
                        )
                        out.append(activate(total, act))
            x, shape = out, [len(layer["weights"]), oh, ow]
    return x


# ---------------------------------------------------------------------------------------------
# EZKL pipeline
# ---------------------------------------------------------------------------------------------


FILES = {
    "onnx": "network.onnx",
    "data": "input.json",
    "settings": "settings.json",
    "compiled": "network.compiled",
    "srs": "kzg.srs",
    "vk": "vk.key",
    "pk": "pk.key",
    "witness": "witness.json",
    "proof": "proof.json",
}


def workdir_paths(workdir: str) -> dict:
    """Where each of EZKL's files lives in the work folder."""
    return {key: os.path.join(workdir, name) for key, name in FILES.items()}


def proof_size(proof_path: str) -> int:
    """Bytes of the raw proof inside EZKL's JSON proof file (its "proof" field, a list of bytes)."""
    with open(proof_path) as f:
        return len(json.load(f)["proof"])


def prove_step(workdir: str, out) -> None:
    """Child-process mode (`--step prove`): one timed prove call; prints {"prove_s": ...}."""
    paths = workdir_paths(workdir)
    start = time.perf_counter()
    ezkl.prove(
        witness=paths["witness"],
        model=paths["compiled"],
        pk_path=paths["pk"],
        proof_path=paths["proof"],
        srs_path=paths["srs"],
    )
    elapsed = time.perf_counter() - start
    print(json.dumps({"prove_s": elapsed}), file=out, flush=True)


def prove_in_child(workdir: str) -> float:
    """Runs `prove_step` in a fresh child process, so that its peak memory is the children's."""
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--step", "prove", "--workdir", workdir],
        stdout=subprocess.PIPE,
        check=True,
        text=True,
    )
    return json.loads(child.stdout)["prove_s"]


def write_settings(paths: dict, scale: int, logrows, lookup_range) -> dict:
    """Writes EZKL's settings and compiled circuit; returns the settings.

    With `logrows`, the settings are fixed: that circuit size, and `lookup_range` for the
    non-linearity tables (the range of their inputs, at the activation scale), by default EZKL's
    own -32768..32768. Without it, EZKL calibrates on this one input: it shrinks the lookup range
    to what the input needs (times a safety margin) and picks the smallest logrows that fits.
    Scale and rebase stay fixed either way, so the result depends only on the model, the input
    and the flags.
    """
    run_args = ezkl.PyRunArgs()
    run_args.input_visibility = "public"
    run_args.output_visibility = "public"
    run_args.param_visibility = "hashed"
    run_args.input_scale = scale
    run_args.param_scale = scale
    if logrows is not None:
        run_args.logrows = logrows
    if lookup_range is not None:
        run_args.lookup_range = tuple(lookup_range)
    ezkl.gen_settings(model=paths["onnx"], output=paths["settings"], py_run_args=run_args)
    if logrows is None:
        ezkl.calibrate_settings(
            data=paths["data"],
            model=paths["onnx"],
            settings=paths["settings"],
            target="resources",
            scales=[scale],
            scale_rebase_multiplier=[1],
        )
    ezkl.compile_circuit(
        model=paths["onnx"], compiled_circuit=paths["compiled"], settings_path=paths["settings"]
    )
    with open(paths["settings"]) as f:
        return json.load(f)


def bench(args: argparse.Namespace) -> dict:
    os.makedirs(args.workdir, exist_ok=True)
    paths = workdir_paths(args.workdir)
    with open(args.input) as f:
        pixels = [float(v) for v in json.load(f)["input"]]
    with open(args.model) as f:
        model = normalize(json.load(f), len(pixels))

    build_onnx(model, paths["onnx"])
    with open(paths["data"], "w") as f:
        json.dump({"input_data": [pixels]}, f)
    settings = write_settings(paths, args.scale, args.logrows, args.lookup_range)
    logrows = settings["run_args"]["logrows"]
    lookup_range = settings["run_args"]["lookup_range"]
    log(f"settings: logrows={logrows} lookup_range={lookup_range} num_rows={settings['num_rows']}")

    ezkl.gen_srs(paths["srs"], logrows)
    start = time.perf_counter()
    ezkl.setup(
        model=paths["compiled"], vk_path=paths["vk"], pk_path=paths["pk"], srs_path=paths["srs"]
    )
    setup_s = time.perf_counter() - start

    start = time.perf_counter()
    witness = ezkl.gen_witness(
        data=paths["data"],
        model=paths["compiled"],
        output=paths["witness"],
        vk_path=paths["vk"],
        srs_path=paths["srs"],
    )
    witness_s = time.perf_counter() - start
    output_scale = settings["model_output_scales"][0]
    output = [ezkl.felt_to_float(felt, output_scale) for felt in witness["outputs"][0]]

    prove_times, verify_times = [], []
    for run in range(args.runs):
        prove_times.append(prove_in_child(args.workdir))
        start = time.perf_counter()
        verified = ezkl.verify(
            proof_path=paths["proof"],
            settings_path=paths["settings"],
            vk_path=paths["vk"],
            srs_path=paths["srs"],
        )
        verify_times.append(time.perf_counter() - start)
        if not verified:
            raise RuntimeError("ezkl.verify rejected the proof")
        log(f"run {run + 1}/{args.runs}: prove {prove_times[-1]:.3f} s, "
            f"verify {verify_times[-1]:.4f} s")

    # ru_maxrss is in KiB on Linux; the children's is the largest of the prove processes'.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "ezkl_version": ezkl.__version__,
        "logrows": logrows,
        "scale": args.scale,
        "lookup_range": lookup_range,
        "setup_s": setup_s,
        "witness_s": witness_s,
        "prove_s": statistics.median(prove_times),
        "verify_s": statistics.median(verify_times),
        "proof_file_bytes": os.path.getsize(paths["proof"]),
        "proof_bytes": proof_size(paths["proof"]),
        "prove_peak_rss_mib": peak_kib / 1024,
        "output": output,
        "float_output": float_forward(model, pixels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Veil model JSON (float weights)")
    parser.add_argument("--input", help='input JSON: {"input": [floats]}')
    parser.add_argument("--workdir", required=True, help="folder for EZKL's files")
    parser.add_argument("--scale", type=int, default=7, help="fixed-point bits of inputs, weights")
    parser.add_argument("--logrows", type=int, help="circuit size 2^K; else EZKL calibrates it")
    parser.add_argument(
        "--lookup-range", type=int, nargs=2, metavar=("LO", "HI"),
        help="inputs the non-linearity tables cover, at the activation scale (with --logrows)",
    )
    parser.add_argument("--runs", type=int, default=1, help="prove/verify N times, report medians")
    parser.add_argument("--step", choices=["prove"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()

    out = claim_stdout()
    if args.step == "prove":
        prove_step(args.workdir, out)
        return
    if not args.model or not args.input:
        parser.error("--model and --input are required")
    if args.lookup_range and args.logrows is None:
        parser.error("--lookup-range needs --logrows (without it EZKL calibrates both)")
    print(json.dumps(bench(args)), file=out, flush=True)


if __name__ == "__main__":
    main()
