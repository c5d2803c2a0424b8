# GPU deployment of the llm-prune job service: `llm-prune serve` with an embedded worker whose jobs
# use every visible GPU (accelerate device_map). Written for reference; it has not been built on
# the project's development machines (no Docker daemon, no GPU there).
#
#   docker build -t llm-prune .
#   docker run --gpus all -p 8000:8000 -v llm-prune-data:/data llm-prune
#   docker exec <container> llm-prune keys create --name me      # prints the API key once
#
# More workers (one per GPU) share the store: LLM_PRUNE_DATABASE_URL=postgresql+psycopg://...
# and `llm-prune worker --device cuda:N` with the same /data volume.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/llm-prune
COPY pyproject.toml Makefile README.md ./
COPY llm_prune llm_prune
COPY data_selection data_selection
COPY recovery recovery
COPY service service
# The same install as `make install` (PyPI's Linux torch wheel is the CUDA build).
RUN make install PY=python3 && .venv/bin/pip install -q 'bitsandbytes>=0.43'

ENV PATH=/opt/llm-prune/.venv/bin:$PATH \
    LLM_PRUNE_DATA_DIR=/data \
    LLM_PRUNE_DEVICE=auto \
    TOKENIZERS_PARALLELISM=false
VOLUME /data
EXPOSE 8000
CMD ["llm-prune", "serve", "--host", "0.0.0.0", "--port", "8000"]
