# ithaca serving image: CUDA runtime, the CUDA build of the pinned torch, non-root.
# Build: docker build -t ithaca .
# Run:   docker run --gpus all --ipc=host -p 8091:8091 ithaca Qwen/Qwen-Image --usp 2
# --ipc=host (or --shm-size=16g): NCCL and torch move data between the local ranks
# through /dev/shm, which Docker caps at 64 MB; without it multi-GPU groups fail or crawl.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/ithaca/.cache/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
# Dependencies first, so code changes reuse the layer. On Linux x86_64 the registry's
# torch wheel of the pinned version is the CUDA build.
COPY constraints/ constraints/
COPY pyproject.toml README.md LICENSE ./
COPY ithaca/ ithaca/
RUN pip install -c constraints/cpu.txt .

RUN useradd --create-home --uid 1000 ithaca \
    && mkdir -p "$HF_HOME" && chown -R ithaca:ithaca /home/ithaca
USER 1000:1000
WORKDIR /home/ithaca

EXPOSE 8091
# Exec form: SIGTERM reaches the server, which forwards it to torchrun.
ENTRYPOINT ["ithaca", "serve"]
