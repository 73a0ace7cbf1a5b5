#!/usr/bin/env bash
# Creates one database and one owning role per service. Passwords come from the
# secret files mounted at /run/secrets (never inline).
set -euo pipefail

create() { # role database password-file
  local password
  password=$(tr -d '\n' < "$3")
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -v role="$1" -v db="$2" -v password="$password" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
}

create orders_svc        orders        /run/secrets/order-service-db-password
create inventory_svc     inventory     /run/secrets/inventory-service-db-password
create notifications_svc notifications /run/secrets/notification-service-db-password
