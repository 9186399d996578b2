# apiban %postun ($1: 0 when the package is erased, 1 or more on an upgrade). On erase: the
# state (saved bans, detection's proofs) goes, and the group (%preun took the token); the
# operator's key file stays, and rpm keeps an edited config.toml as config.toml.rpmsave.
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/apiban
    if getent group apiban >/dev/null; then
        groupdel apiban || :
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
