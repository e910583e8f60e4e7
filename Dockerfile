# moonroute's container image: a release build on Debian bookworm, run as a non-root user.
#
#   docker build -t moonroute .
#   docker run -d --name moonroute -e MOONROUTE_ADVERTISE=sip.example.com:5060 \
#       -p 5060:5060/udp -p 5060:5060/tcp -p 127.0.0.1:9060:9060 \
#       -v moonroute-data:/var/lib/moonroute moonroute
#   docker exec moonroute moonroute ctl --config /etc/moonroute/moonroute.toml status
#
# See docs/deploying.md for the configuration and the script.

# --- build: the whole toolchain, thrown away afterwards -----------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# .dockerignore keeps target/ and .git out of the context.
COPY . .
# --locked: exactly the dependencies of Cargo.lock. The debug info of the release profile is
# stripped; the symbols stay, so a backtrace still names functions.
RUN cargo build --release --locked --bin moonroute \
    && strip --strip-debug target/release/moonroute \
    && cp target/release/moonroute /usr/local/bin/moonroute \
    && /usr/local/bin/moonroute --version

# --- run: Debian slim, the binary, the configuration and the script ----------------------
FROM debian:bookworm-slim
# ca-certificates: the roots TLS next hops are verified against ([tls] ca_file empty).
# A fixed UID/GID (5060) so a bind-mounted data directory can be chowned ahead of time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 5060 moonroute \
    && useradd --system --uid 5060 --gid moonroute --home-dir /var/lib/moonroute \
        --shell /usr/sbin/nologin moonroute \
    && install -d -o moonroute -g moonroute -m 0700 /var/lib/moonroute \
    && install -d -o moonroute -g moonroute -m 0750 /run/moonroute
COPY --from=builder /usr/local/bin/moonroute /usr/local/bin/moonroute
# It listens on every address of the container and advertises MOONROUTE_ADVERTISE, the
# address phones and peers reach the host at (given at `docker run -e`).
COPY contrib/docker.toml /etc/moonroute/moonroute.toml
COPY scripts/default.lua /etc/moonroute/default.lua

# Registrations (sled), users (HA1s) and the server key that signs Record-Route and nonces.
VOLUME ["/var/lib/moonroute"]
# SIP over UDP and TCP; the Prometheus endpoint (publish it on the host's loopback only).
EXPOSE 5060/udp 5060/tcp 9060/tcp

USER moonroute
WORKDIR /var/lib/moonroute
# SIGTERM is moonroute's orderly stop (SIGHUP reloads the script).
STOPSIGNAL SIGTERM
# Healthy when the server answers on its control socket.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["moonroute", "ctl", "--config", "/etc/moonroute/moonroute.toml", "status"]
ENTRYPOINT ["moonroute"]
CMD ["run", "--config", "/etc/moonroute/moonroute.toml"]
