# The lab and worker image. python:3.12-slim is multi-arch (amd64, arm64: ARM Macs included).
FROM python:3.12-slim-bookworm

# redis-server for the experiments that start a scratch broker; procps for pgrep (pool children)
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /course
COPY pyproject.toml constraints.txt README.md ./
COPY celerylab ./celerylab
RUN pip install --no-cache-dir -c constraints.txt -e '.[dev]' \
 && python -c "from celerylab.cli import install_lab_overrides; install_lab_overrides()"

EXPOSE 8888
CMD ["python", "-m", "celerylab", "open", "--no-browser"]
