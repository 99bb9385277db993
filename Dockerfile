# finetune-service for a CUDA machine: `docker build -t finetune-service .`
# then `docker run --gpus all -p 8000:8000 -v finetune-data:/data -v torch-cache:/root/.cache/torch finetune-service`
# It starts like `make serve`: migrations, then the API and one worker (one job per GPU).

# The chart library for the pages comes from the npm registry at build time, never from a CDN.
FROM node:20-slim AS assets
WORKDIR /build
COPY package.json ./
RUN npm install --no-audit --no-fund --loglevel=error

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FINETUNE_DATA_DIR=/data \
    FINETUNE_ASSETS_DIR=/srv/finetune/node_modules \
    # Inside a container the service must listen on all interfaces; publish the port deliberately.
    FINETUNE_HOST=0.0.0.0
WORKDIR /srv/finetune

# Dependencies first (cached layer): PyPI's Linux torch wheels bundle the CUDA runtime.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib;p=tomllib.load(open('pyproject.toml','rb'))['project'];print('\n'.join(p['dependencies']+p['optional-dependencies']['service']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY finetune ./finetune
COPY app ./app
COPY alembic ./alembic
COPY alembic.ini ./
# Editable, so the service finds alembic/ and node_modules/ next to its code.
RUN pip install --no-deps -e .
COPY --from=assets /build/node_modules ./node_modules

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["python", "-m", "app.cli", "serve"]
