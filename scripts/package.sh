#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (a release build) and prints its path as the last
# line: target/debian/ringway_<version>-1_<arch>.deb.
#
# What goes in it is [package.metadata.deb] in Cargo.toml: /usr/bin/ringway (debug symbols in
# /usr/lib/debug), the systemd unit (deploy/ringway.service with ExecStart=/usr/bin/ringway), the
# ringway account (deploy/ringway.sysusers), /etc/ringway/ringway.env and /etc/ringway/backends
# (conffiles), /etc/logrotate.d/ringway, and the docs in /usr/share/doc/ringway. Installing it
# neither enables nor starts the service. docs/operations.md ("Packaging") has the rest.
#
# Outside a git checkout (a source tarball), set RINGWAY_BUILD_COMMIT to the commit it came
# from, or `ringway --version` says "commit unknown". Extra arguments go to cargo deb.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned, so every build packages the same way. Builds from source once (a few minutes).
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

# What cargo-deb takes from target/deb-units: the unit in deploy/ (which installs by hand to
# /usr/local/bin) with the binary where the package puts it, the account it runs as, and the
# postinst its generated parts go into.
units=target/deb-units
rm -rf "$units"
mkdir -p "$units"
sed -e 's#^ExecStart=/usr/local/bin/ringway #ExecStart=/usr/bin/ringway #' \
    -e "s#^ExecReload=/bin/sh -c '/usr/local/bin/ringway #ExecReload=/bin/sh -c '/usr/bin/ringway #" \
    deploy/ringway.service >"$units/ringway.service"
if ! grep -q '^ExecStart=/usr/bin/ringway ' "$units/ringway.service" ||
    ! grep -q "^ExecReload=/bin/sh -c '/usr/bin/ringway " "$units/ringway.service" ||
    grep -q '^Exec.*/usr/local/bin/ringway' "$units/ringway.service"; then
    echo "package.sh: deploy/ringway.service: ExecStart=/ExecReload= lines with /usr/local/bin/ringway not rewritten" >&2
    exit 1
fi
cp deploy/ringway.sysusers "$units/ringway.sysusers"
cp deploy/debian/postinst "$units/postinst"

# cargo deb prints the path of the package as its last line of output.
deb=$(cargo deb --separate-debug-symbols --compress-debug-symbols "$@" | tail -n 1)
if [ ! -f "$deb" ]; then
    echo "package.sh: cargo deb did not report a package (got: $deb)" >&2
    exit 1
fi
echo "$deb"
