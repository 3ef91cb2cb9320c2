# The fast path's worker process, in bash: what Metaflow's runtime launches for a sandboxed task.
#
#     bash thin_client.sh PYTHON flow.py <top-level options> sandbox step <step> ...
#
# thin_client.py does the same in Python; this one starts in about 1 ms instead of 10 and holds
# about 2 MB instead of 4, which on 2 cores is a tenth of what a sandboxed task costs on top of a
# plain one. bash has no unix sockets, so it speaks to the run's sandbox server over TCP on
# 127.0.0.1 (bash's /dev/tcp), and sends only "TOKEN PID": the server reads this process's argv,
# environment and working directory from /proc/PID and opens its stdin/stdout/stderr there, which it
# may only do for a process of its own user, and the token (in this process's environment, which
# only that user can read) proves the request comes from the task it names. The server answers lines
# "pid N", then "exit N" (negative: killed by that signal) or "fallback <reason>"; this client sends
# "sig N" for SIGINT, SIGTERM and SIGHUP, and "sig 15" when the launcher dies. Where the server
# cannot be reached it becomes the trampoline itself (exec), after a one-line notice.

python=$1
shift
trap '' PIPE  # a write to a closed connection fails instead of killing us

fall_back() {
    exec 3>&-
    printf 'metaflow-sandbox: fast path not used (%s); running the trampoline instead\n' "$1" >&2
    exec "${METAFLOW_SANDBOX_LAUNCHER_PYTHON:-$python}" "${args[@]}"
}

args=("$@")
case "${METAFLOW_SANDBOX_FAST_PATH:-1}" in
    0 | [Ff]alse | FALSE | [Nn]o | NO | [Oo]ff | OFF) fall_back "METAFLOW_SANDBOX_FAST_PATH is off" ;;
esac
port=$METAFLOW_SANDBOX_SERVER_PORT
[ -n "$port" ] && [ -n "$METAFLOW_SANDBOX_SERVER_TOKEN" ] || fall_back "no sandbox server for this run"

# The server may still be starting (importing Metaflow): wait while it is alive, up to a minute.
# Dead is gone or a zombie (the launcher reaps it only at the end of the run).
server_alive() {
    local state=Z
    [ -n "$METAFLOW_SANDBOX_SERVER_PID" ] && read -r -u 4 _ _ state _ 4<"/proc/$METAFLOW_SANDBOX_SERVER_PID/stat"
    [ "$state" != Z ] && [ "$state" != X ]
} 2>/dev/null
deadline=$((SECONDS + 60))
until { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ] || ! server_alive; then
        fall_back "the run's sandbox server is not running"
    fi
    sleep 0.02
done

# From here on fds 0, 1 and 2 are never redirected, not even for a moment: the server opens them
# through /proc/$$/fd. So writes to the connection go through a subshell, reads use `read -u`.
read -r -u 4 _ _ _ launcher _ 4</proc/$$/stat  # our parent: the runtime
forward() { (printf 'sig %d\n' "$1") >&3 2>/dev/null; }
trap 'forward 2' INT
trap 'forward 15' TERM
trap 'forward 1' HUP
(printf '%s %d\n' "$METAFLOW_SANDBOX_SERVER_TOKEN" "$$") >&3 || fall_back "the sandbox server refused the task"

kind=
told_launcher_gone=
while :; do
    read -r -t 0.25 -u 3 kind value
    status=$?
    if [ $status = 0 ]; then
        case $kind in exit | fallback) break ;; esac
        kind=
        continue
    fi
    [ $status -gt 128 ] || break  # end of the connection; above 128: a timeout, or a signal we forwarded
    if [ -z "$told_launcher_gone" ]; then
        # The launcher died (we were reparented): end the task, which destroys its sandbox. Only on a read
        # that succeeded: a signal cutting it short must not look like a new parent.
        if read -r -u 4 _ _ _ parent _ 4</proc/$$/stat && [ -n "$launcher" ] && [ "$parent" != "$launcher" ]; then
            told_launcher_gone=1
            forward 15
        fi
    fi
done
exec 3>&-

case $kind in
    exit)
        if [ "$value" -lt 0 ]; then  # died by a signal: so do we, so the runtime sees the same status
            trap - INT TERM HUP
            kill -s "$((-value))" $$
            exit $((128 - value))
        fi
        exit "$value"
        ;;
    fallback) fall_back "$value" ;;
esac
echo "metaflow-sandbox: the sandbox server lost this task (its process ended without an exit code)" >&2
exit 1
