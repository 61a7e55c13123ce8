#!/bin/sh
# Put in place as /usr/sbin/policy-rc.d by `make system-packages` while it installs Debian's packages, and removed
# again: nginx and prometheus, whose packages start a server on every address (ports 80 and 9090), may not start;
# any other service may, as without this file. Exit 101 forbids the action, 0 allows it
# (/usr/share/doc/init-system-helpers/README.policy-rc.d.gz). Called by invoke-rc.d as
# `policy-rc.d [--quiet] nginx start` and by deb-systemd-invoke as `policy-rc.d nginx.service start`.
for argument; do
    case "$argument" in
        -*) ;;
        *)
            case "${argument%.service}" in
                nginx | prometheus) exit 101 ;;
            esac
            exit 0
            ;;
    esac
done
exit 0
