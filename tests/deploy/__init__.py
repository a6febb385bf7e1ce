"""Tests of the deployment configuration (docker-compose.yml and deploy/)."""
