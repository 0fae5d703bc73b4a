# rnnserve server image: serves the model repository at /models (the shipped models by default).
# CPU by default; for NVIDIA GPUs build with  --build-arg EXTRAS=cuda  and run with --gpus all
# (the cuda extra brings the CUDA and cuDNN runtime wheels that onnxruntime-gpu needs).
FROM python:3.11-slim AS build
ARG EXTRAS=fast
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY client ./client
COPY export ./export
RUN pip install --no-cache-dir --prefix=/install ".[${EXTRAS}]"

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY models /models
RUN useradd --system --uid 10001 rnnserve
USER rnnserve
ENV RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_METRICS_HOST=0.0.0.0 \
    RNNSERVE_MODELS=/models \
    PYTHONUNBUFFERED=1
EXPOSE 50051 9464
# SIGTERM: health goes NOT_SERVING, in-flight steps finish, exit within RNNSERVE_SHUTDOWN_GRACE_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve", "serve"]
