# apiban %preun ($1: 0 when the package is erased, 1 or more when an upgrade removes the old
# version). An upgrade changes nothing here: the new version's %post restarts the agent, and
# the program stays attached with its maps. Erasing is RPM's last step (it has no
# remove-but-keep like dpkg's): the agent stops and `apiban detach` removes the program and
# its pinned maps, as the .deb's purge does. To stop the agent and keep what is banned
# dropped, `systemctl disable --now apiban` instead.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now apiban.service >/dev/null 2>&1 || :
    fi
    # Made by %post, not a packaged file: gone before rpm removes /etc/apiban if empty.
    rm -f /etc/apiban/ban-api-token
    if [ -x /usr/bin/apiban ]; then
        /usr/bin/apiban detach || \
            echo "apiban: 'apiban detach' failed; the XDP program may still be attached" \
                "(see 'ip -d link'); remove it with 'ip link set dev IFACE xdp off'" >&2
    fi
fi
exit 0
