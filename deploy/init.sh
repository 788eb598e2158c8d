#!/bin/sh
# One-shot: migrate the database, create the keys (fleet CA, director, TUF) on the shared volume,
# write the broker's mTLS config for the `mosquitto` host, an admin token for the simulator and a
# `cloud` token for the cloud tier replicas (their identity towards the servers).
# The ACL admits each server replica's MQTT identities (FLEET_MQTT_SERVER_NAME of server1/server2).
set -eu
fleet broker config /broker --bind 0.0.0.0 --port 8883 --hostname mosquitto \
  --server-name server1 --server-name server2
# every connection is a file descriptor: size the broker for the fleet
sed -i 's/^max_connections .*/max_connections 60000/' /broker/mosquitto.conf
if [ ! -s /shared/admin.token ]; then
  fleet admin token create --role admin --name compose-simulator > /shared/admin.token
fi
if [ ! -s /shared/cloud.token ]; then
  fleet admin token create --role cloud --name compose-cloud > /shared/cloud.token
fi
echo "init done"
