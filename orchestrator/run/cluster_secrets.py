"""The secrets of a launcher cluster (clusters/aws.yaml, clusters/gcp.yaml), generated once as the
KEY=value lines its nodes source before `ray start`; the cloud's secret store keeps them:

    aws secretsmanager create-secret --name dreamsweep-cluster --secret-string "$(python3 -m orchestrator.run.cluster_secrets)"
    python3 -m orchestrator.run.cluster_secrets | gcloud secrets create dreamsweep-cluster --data-file=-

Every value is random (`secrets.token_hex`): nothing here is a default that someone else also has.
"""

from __future__ import annotations

import secrets


def cluster_secrets() -> dict[str, str]:
    return {
        # Ray's token authentication (Ray >= 2.52): the dashboard, the Jobs API and the GCS ask for it.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # The PostgreSQL role `dreamsweep` on the head (MLflow's backend store, the Optuna study).
        "DREAMSWEEP_PG_PASSWORD": secrets.token_hex(24),
        # The MLflow server's basic-auth: its admin user, which the driver and the workers log in as.
        "MLFLOW_TRACKING_USERNAME": "dreamsweep",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(24),
        # Signs the MLflow server's sessions and CSRF tokens; the same on every server worker.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }


def main() -> None:
    print("\n".join(f"{key}={value}" for key, value in cluster_secrets().items()))


if __name__ == "__main__":
    main()
