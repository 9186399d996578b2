# apiban %post ($1: 1 on install, 2 or more on upgrade). Never starts or enables what the
# operator has not configured. On an upgrade a running agent is restarted onto the new
# binary; its XDP program stays attached throughout, so protection never lapses. As the
# .deb's postinst.

# The ban API's token, made once and kept across upgrades: readable by root and the group
# apiban, which a SIP proxy's user may join (usermod -aG apiban kamailio). The unit hands it
# to the agent; with ban-api on, every request must carry it.
if ! getent group apiban >/dev/null; then
    groupadd --system apiban
fi
if [ ! -s /etc/apiban/ban-api-token ]; then
    (
        umask 077
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >/etc/apiban/ban-api-token
        echo >>/etc/apiban/ban-api-token
    )
    chgrp apiban /etc/apiban/ban-api-token
    chmod 0640 /etc/apiban/ban-api-token
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if systemctl is-active --quiet apiban.service; then
        systemctl try-restart apiban.service || :
    fi
fi
if [ ! -s /etc/apiban/key ]; then
    echo "apiban: put your APIBAN key in /etc/apiban/key (chmod 600; free at" \
        "https://apiban.org/getkey.html), set iface in /etc/apiban/config.toml, then" \
        "'systemctl enable --now apiban'."
fi
exit 0
