# One image for the API and the workers; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/distill

# torch first, pinned, in its own layer: it is most of the image and changes least.
# PyPI's Linux wheel carries CUDA, so the same image runs GPU workers and CPU ones.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY distill ./distill
COPY migrations ./migrations
COPY alembic.ini ./
COPY client ./client
RUN pip install . ./client && useradd --create-home --uid 1000 distill && mkdir -p /data/artifacts \
    && chown -R distill /data

USER distill
ENV DISTILL_ARTIFACTS_DIR=/data/artifacts
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
