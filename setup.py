"""Packaging for attn-fast.

`kernels/` (Triton only) is installed as `attn_fast.kernels` through a package_dir mapping, so that no top-level
module called `kernels` is created (an unrelated PyPI package already owns that name).
"""
from setuptools import setup

# The example models (attn_fast.examples) and the benchmark (attn_fast.tools.bench, which times the Seq2Seq model
# too): locale data for the dates task, BLEU, progress bars, heatmaps / overlays / benchmark plots.
EXAMPLES_REQUIRES = ["babel>=2.10", "sacrebleu>=2.0", "tqdm", "matplotlib"]

# swap_attention's tests and framework bench against the real SpeechBrain 1.1.2 and OpenNMT-py 3.5.1: their
# import-time dependencies only. The frameworks themselves go in with --no-deps (README, "Use it in your model"):
# OpenNMT-py 3.5.1 pins torch<2.3 and SpeechBrain pulls a torchaudio built for another torch, either of which would
# replace or break the installed torch.
#   pip install -e ".[integrations]" && pip install --no-deps speechbrain==1.1.2 OpenNMT-py==3.5.1 coqui-tts==0.28.0
# (the README's test command does both, so CI tests against the real packages; about a minute of installs).
INTEGRATIONS_REQUIRES = [
    "HyperPyYAML>=1.2",                                  # speechbrain.core
    "ConfigArgParse", "pyonmttok", "spacy", "pyahocorasick", "rapidfuzz", "fasttext-wheel",  # onmt/__init__
    "scipy",                                             # Coqui TTS's tacotron attention layers
]

# ONNX export (attn_fast.export) and its tests: the dynamo exporter's packages and the runtime that checks the graphs
# (the versions the tests were run with).
EXPORT_REQUIRES = ["onnx>=1.23", "onnxscript>=0.7", "onnxruntime>=1.32"]

setup(
    name="attn-fast",
    version="0.1.0",
    description="Fused Triton kernels for additive (Bahdanau) attention, with a drop-in layer and a PyTorch reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "attn_fast", "attn_fast.kernels", "attn_fast.backends", "attn_fast.backends.cpu_kernels", "attn_fast.nn",
        "attn_fast.examples",
        "attn_fast.examples.seq2seq", "attn_fast.examples.captioning", "attn_fast.tools", "attn_fast.tools.bench",
        "attn_fast.integrations",
    ],
    package_dir={"attn_fast": "attn_fast", "attn_fast.kernels": "kernels"},
    # The bench's static sm_90 predictions (written by `python -m benchmarks.static_report`): no checkout needed.
    package_data={"attn_fast.tools.bench": ["static_sm90_predictions.json"]},
    install_requires=[
        # 2.6 is the first release with torch.library.triton_op; no upper pin.
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
        "numba>=0.60",  # the fused CPU kernels of backend "cpu" (attn_fast/backends/cpu_kernels)
    ],
    extras_require={
        "seq2seq": EXAMPLES_REQUIRES,
        "captioning": EXAMPLES_REQUIRES,
        "bench": EXAMPLES_REQUIRES,
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff", *EXAMPLES_REQUIRES, *EXPORT_REQUIRES],
        "integrations": INTEGRATIONS_REQUIRES,
        "export": EXPORT_REQUIRES,
    },
    entry_points={"console_scripts": ["attn-fast = attn_fast.tools.cli:main"]},
)
