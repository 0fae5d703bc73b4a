# rnnserve server image: serves the model repository at /models (the shipped models by default).
#
#   docker build -t rnnserve .            (or: podman build --format docker -t rnnserve .)
#   docker run --rm -p 50051:50051 -p 9464:9464 rnnserve
#
# CPU by default; for NVIDIA GPUs build with  --build-arg EXTRAS=cuda  and run with --gpus all
# (the cuda extra brings the CUDA and cuDNN runtime wheels that onnxruntime-gpu needs).
# BASE: any image with Python 3.10+ and its venv module, used by both stages (the virtualenv
# links to the base's python). `make image-test` builds on a local Debian base instead.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG EXTRAS=fast
RUN python3 -m venv /opt/rnnserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY client ./client
COPY export ./export
# An optional wheelhouse (`make wheelhouse`: the runtime dependencies and the build backend as
# wheels) lets the image build without reaching the package index. The glob matches nothing in
# a plain checkout; pyproject.toml is named too because COPY needs one source that exists.
COPY pyproject.toml wheel[s] /wheels/
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        /opt/rnnserve/bin/pip install --no-cache-dir --no-index --find-links /wheels \
            "/src[${EXTRAS}]"; \
    else \
        /opt/rnnserve/bin/pip install --no-cache-dir "/src[${EXTRAS}]"; \
    fi \
    && /opt/rnnserve/bin/pip uninstall -y -q pip setuptools \
    && /opt/rnnserve/bin/python -c "import importlib.util as u; assert not u.find_spec('torch')"

FROM ${BASE}
COPY --from=build /opt/rnnserve /opt/rnnserve
COPY models /models
# A numeric user (no name to look up, so Kubernetes' runAsNonRoot can verify it); it owns
# nothing in the image: the code and the models are read-only to it.
USER 10001:10001
ENV PATH=/opt/rnnserve/bin:$PATH \
    HOME=/tmp \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_METRICS_HOST=0.0.0.0 \
    RNNSERVE_MODELS=/models \
    PYTHONUNBUFFERED=1
EXPOSE 50051 9464
# gRPC health of the inference service, on the port of the server's own settings. Loading and
# self-checking the models takes seconds: start-period covers it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["rnnserve", "probe"]
# SIGTERM: health goes NOT_SERVING, in-flight steps finish, exit within RNNSERVE_SHUTDOWN_GRACE_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve", "serve"]
