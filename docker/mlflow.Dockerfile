# The tracking server of compose.yaml: MLflow with the PostgreSQL driver (MLflow's own image has none).
# Pins match constraints.txt.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && useradd --create-home --uid 1000 --user-group mlflow \
    && mkdir /mlartifacts && chown mlflow:mlflow /mlartifacts
USER 1000:1000
EXPOSE 5000
ENTRYPOINT ["mlflow"]
