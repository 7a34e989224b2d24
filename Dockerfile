# One image for both services: `fedmq aggregator` and `fedmq worker` (compose.yaml picks the
# command). Build it with `docker compose build`, or alone:
#
#   docker build -t fedmq .                                                  # CPU torch (small)
#   docker build -t fedmq:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .   # CUDA torch
#
# torch and torchvision are installed at the versions pyproject.toml pins, from TORCH_INDEX_URL:
# PyTorch's CPU-only index by default (an image of about 1.5 GB), or any index with CUDA builds
# (PyPI's Linux wheels are CUDA builds, about 5.5 GB installed; they need only the host's NVIDIA
# driver and the NVIDIA container toolkit, not a CUDA base image).
ARG PYTHON_BASE_IMAGE=python:3.11-slim
FROM ${PYTHON_BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /opt/fedmq
COPY pyproject.toml ./

# pyproject.toml is the one list of dependencies: torch and torchvision (from TORCH_INDEX_URL)
# in a layer of their own, which source changes never rebuild, then everything else.
RUN python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
open("/tmp/torch.txt", "w").write("\n".join(d for d in deps if d.startswith("torch"))); \
open("/tmp/deps.txt", "w").write("\n".join(d for d in deps if not d.startswith("torch")))' \
 && python3 -m pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt
RUN python3 -m pip install -r /tmp/deps.txt "setuptools>=68" wheel \
 && rm /tmp/torch.txt /tmp/deps.txt

COPY fedmq ./fedmq
COPY aggregator ./aggregator
COPY worker ./worker
COPY fedmq_cli ./fedmq_cli
COPY README.md ./
RUN python3 -m pip install --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info \
 && cd / && fedmq --help >/dev/null

# A user of its own; the folders compose mounts volumes on belong to it, so new named volumes
# start out writable by it.
RUN useradd --create-home --uid 10001 --user-group fedmq \
 && mkdir -p /data /results /tmp/fedmq-training-slots \
 && chown fedmq:fedmq /data /results /tmp/fedmq-training-slots
USER fedmq
WORKDIR /home/fedmq
ENV FEDMQ_DATA_ROOT=/data \
    FEDMQ_OUTPUT_DIR=/results

# Exec form: fedmq is PID 1 and receives SIGTERM from `docker stop` itself (a worker says
# goodbye and exits 0; the aggregator stops between events with its checkpoint intact).
ENTRYPOINT ["fedmq"]
CMD ["--help"]
