# Runs a test's PostgreSQL server and outlives the test process to clean up after it: once that
# process is gone, however it ended (a normal exit, or SIGKILL, which no exit handler sees), the
# server is stopped and its directory removed. SIGINT or SIGTERM to this shell stops the server
# within a second (it sleeps in the foreground).
#
# Arguments: the test process's pid, the server's directory, then the server's command.
# PostgresTestServer.swift and pgserver.py pass this file's text to `sh -c` rather than its path:
# it runs as the postgres user, who may not be able to read the checkout.
parent=$1 directory=$2
shift 2
"$@" & server=$!
trap 'kill -INT $server 2>/dev/null' INT TERM
while [ -d "/proc/$parent" ] && kill -0 $server 2>/dev/null; do sleep 1; done
kill -INT $server 2>/dev/null; wait $server
rm -rf "$directory"
