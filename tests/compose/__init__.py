"""The compose stack without a Docker engine: docker-compose.yml read and run natively."""
