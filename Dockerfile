# The ScaleCap Fleet image: GPU workers, the I/O worker and the API (docker-compose.yml).
# The [worker] extra pulls the regular vLLM wheel, which brings its own CUDA build of torch;
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf

# Extras to install; the API service needs [api] as well.
ARG EXTRAS=worker,api

WORKDIR /app
# Dependencies first, so editing the code does not reinstall vLLM.
COPY pyproject.toml README.md ./
RUN mkdir -p scalecap workers producer \
    && touch scalecap/__init__.py workers/__init__.py producer/__init__.py \
    && pip install ".[${EXTRAS}]" \
    && pip uninstall -y scalecap-fleet
COPY scalecap ./scalecap
COPY workers ./workers
COPY producer ./producer
RUN pip install --no-deps ".[${EXTRAS}]"

RUN useradd --create-home --uid 1000 scalecap \
    && mkdir -p /models/hf && chown scalecap /models/hf
USER scalecap

CMD ["scalecap", "--help"]
