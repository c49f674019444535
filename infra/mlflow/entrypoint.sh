#!/bin/sh
# The team MLflow server: PostgreSQL for runs, the registry and users; artifacts in S3, proxied by the
# server; MLflow's basic-auth app in front of every API, UI page and artifact. Plain HTTP: TLS ends at
# the load balancer in front of it (infra/mlflow/k8s.yaml's Ingress), never here.
#
# Configured from the environment only, so that no secret is in the image or in git. Each secret can
# come as a variable or as a file (VAR_FILE, a mounted Kubernetes secret):
#   MLFLOW_BACKEND_STORE_URI        the postgresql:// URI of the database, password in it (secret)
#   MLFLOW_AUTH_ADMIN_PASSWORD      the first admin's password, used once on an empty store (secret)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app, the same on every replica    (secret)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/mlflow-artifacts; S3 credentials from the AWS chain
#                                   (IRSA on EKS), endpoint from AWS_ENDPOINT_URL if set
#   MLFLOW_AUTH_ADMIN_USERNAME      default admin
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a signed-in user may do where nobody granted more (default READ)
#   MLFLOW_ALLOWED_HOSTS            Host headers to answer (the load balancer's name); MLflow's default
#                                   (localhost and private IPs) otherwise
#   MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS   default 0.0.0.0, 5000, 4
set -eu

for name in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    file=$(eval "printf '%s' \"\${${name}_FILE:-}\"")
    if [ -n "$file" ]; then
        value=$(cat "$file") || { echo "entrypoint: cannot read ${name}_FILE=$file" >&2; exit 2; }
        export "$name=$value"
    fi
done
for name in MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION MLFLOW_FLASK_SERVER_SECRET_KEY; do
    if [ -z "$(eval "printf '%s' \"\${$name:-}\"")" ]; then
        echo "entrypoint: $name is not set (see the list at the top of $0)" >&2
        exit 2
    fi
done
case "$MLFLOW_BACKEND_STORE_URI" in
    postgresql://* | postgresql+*://*) ;;
    *) echo "entrypoint: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI for a team server" >&2; exit 2 ;;
esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in
    s3://*) ;;
    *) echo "entrypoint: MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URI, got $MLFLOW_ARTIFACTS_DESTINATION" >&2
       exit 2 ;;
esac

# The auth app reads its user database from a config file only: write one for this process, readable by
# it alone, with the users in the same PostgreSQL database (their tables and migrations are separate).
umask 077
config="$(mktemp -d)/basic_auth.ini"
cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $MLFLOW_BACKEND_STORE_URI
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"

# The store URI (with its password) and the bucket reach `mlflow server` through the environment
# (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION), not its command line, which `ps` shows.
# Proxied artifacts (--serve-artifacts): clients up- and download through this server, behind its auth,
# and only its role may touch the bucket's mlflow-artifacts/ prefix; Ray nodes and laptops need no S3
# rights for models.
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
set -- --app-name basic-auth --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}"
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    set -- "$@" --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
fi
exec mlflow server "$@"
