#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379), RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432, the
# matrix's database result backend) answer; start them if not.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! port_open 5672; then
  echo "starting rabbitmq-server"
  rabbitmq-server -detached
fi
if ! port_open 5432; then
  echo "starting postgresql"
  if command -v pg_ctlcluster >/dev/null; then
    cluster=$(pg_lsclusters -h | awk 'NR == 1 {print $1 " " $2}')
    pg_ctlcluster ${cluster:-15 main} start
  else
    echo "no pg_ctlcluster: start PostgreSQL on 127.0.0.1:5432 (user postgres, trust) yourself" >&2
  fi
fi

for _ in $(seq 1 120); do
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && port_open 5672 && port_open 5432; then
    echo "redis, rabbitmq and postgresql are up"
    exit 0
  fi
  sleep 1
done
echo "redis, rabbitmq or postgresql did not come up in 120 s" >&2
exit 1
