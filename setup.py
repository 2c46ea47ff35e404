from setuptools import find_packages, setup

setup(
    name="scope_ds",
    version="0.1.0",
    description="SCOPE (signal-calibrated on-policy distillation) and its baselines on DeepSpeed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["scope_ds", "scope_ds.*"]),
    install_requires=[
        # 2.13.0 is what .ci/run installs first (a CPU build); any newer CUDA build works on GPUs.
        "torch>=2.4",
        # the first release with everything scope_ds calls (engines/ds.py DEEPSPEED_FLOOR says what)
        "deepspeed>=0.19.4",
        "transformers>=4.46",
        "datasets>=3.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "math-verify>=0.7",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        # httpcore imports sniffio on every request (anyio 4.10+ no longer pulls it in): without it,
        # each request is a failed import, a search of sys.path; 30% of a toy step's generation time.
        "sniffio>=1.3",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "psutil>=5.9",
        "accelerate>=1.1",  # transformers needs it for DeepSpeed ZeRO-3 loading
    ],
    extras_require={
        "test": ["pytest>=8.0", "ruff>=0.6"],
        "mpi": ["mpi4py>=3.1"],  # needs an MPI library (Debian: libopenmpi-dev openmpi-bin)
        "bench": ["trl>=1.16"],  # tools/bench_peer.py's other side only
    },
)
