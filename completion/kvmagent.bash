# bash completion for kvmagent(1): subcommands, options, guest names.
_kvmagent_guests() {
    local dir=${KVMAGENT_CONFIG_DIR:-/etc/kvmagent}/guests f
    for f in "$dir"/*.toml; do
        [ -e "$f" ] || continue
        f=${f##*/}
        printf '%s\n' "${f%.toml}"
    done
}

_kvmagent() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd="" i
    # -H HOST (anywhere): ssh's known hosts, as ssh's own completion offers them
    if [[ ${COMP_WORDS[COMP_CWORD-1]} == -H ]]; then
        if declare -F _known_hosts_real >/dev/null; then
            _known_hosts_real -a -- "$cur"
        fi
        return
    fi
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --config-dir|-H) ((i++)) ;;
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    case $cmd in
        "")
            COMPREPLY=($(compgen -W "validate show list status history start stop restart
                                     install console bridge import clone kernel repin
                                     reset-counters reload migrate run
                                     --help --version --config-dir -H" -- "$cur")) ;;
        validate) COMPREPLY=($(compgen -W "--host --help $(_kvmagent_guests)" -- "$cur")) ;;
        show) COMPREPLY=($(compgen -W "--json --help $(_kvmagent_guests)" -- "$cur")) ;;
        status) COMPREPLY=($(compgen -W "--lines --json --help $(_kvmagent_guests)" -- "$cur")) ;;
        history) COMPREPLY=($(compgen -W "--since --json --help $(_kvmagent_guests)" -- "$cur")) ;;
        repin|reset-counters) COMPREPLY=($(compgen -W "--help $(_kvmagent_guests)" -- "$cur")) ;;
        reload) COMPREPLY=($(compgen -W "--quiet --help $(_kvmagent_guests)" -- "$cur")) ;;
        start)
            if [[ ${COMP_WORDS[COMP_CWORD-1]} == --transient ]]; then
                COMPREPLY=($(compgen -f -- "$cur"))
            else
                COMPREPLY=($(compgen -W "--no-block --transient --help $(_kvmagent_guests)" -- "$cur"))
            fi ;;
        restart) COMPREPLY=($(compgen -W "--no-block --help $(_kvmagent_guests)" -- "$cur")) ;;
        run) COMPREPLY=($(compgen -W "--file --install --vnc --help $(_kvmagent_guests)" -- "$cur")) ;;
        stop) COMPREPLY=($(compgen -W "--force --no-block --help $(_kvmagent_guests)" -- "$cur")) ;;
        console) COMPREPLY=($(compgen -W "--timeout --help $(_kvmagent_guests)" -- "$cur")) ;;
        clone) COMPREPLY=($(compgen -W "--snapshot --copy --help $(_kvmagent_guests)" -- "$cur")) ;;
        import)
            if ((COMP_CWORD == i + 1)); then
                COMPREPLY=($(compgen -W "kvm-script xen --help" -- "$cur"))
            elif [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W "--name --bridge --write --force --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -f -- "$cur"))
            fi ;;
        migrate)
            # migrate NAME HOST: a guest, then ssh's known hosts
            local words=0 j
            for ((j = i + 1; j < COMP_CWORD; j++)); do
                case ${COMP_WORDS[j]} in
                    --max-downtime|--bandwidth|--transport) ((j++)) ;;
                    -*) ;;
                    *) ((words++)) ;;
                esac
            done
            if [[ $cur == -* ]] || ((words > 1)); then
                COMPREPLY=($(compgen -W "--copy-storage --copy-config --max-downtime --bandwidth
                                         --transport --force --json --help" -- "$cur"))
            elif ((words == 1)); then
                declare -F _known_hosts_real >/dev/null && _known_hosts_real -a -- "$cur"
            else
                COMPREPLY=($(compgen -W "$(_kvmagent_guests)" -- "$cur"))
            fi ;;
        kernel)
            if [[ ${COMP_WORDS[COMP_CWORD-1]} == --from-host ]]; then
                local v
                COMPREPLY=($(for v in /boot/vmlinuz-*; do [ -e "$v" ] && printf '%s\n' "${v#/boot/vmlinuz-}"; done | grep -- "^$cur"))
            else
                COMPREPLY=($(compgen -W "--from-host --help $(_kvmagent_guests)" -- "$cur"))
            fi ;;
        install)
            if [ "${COMP_WORDS[COMP_CWORD - 1]}" = --iso ]; then
                COMPREPLY=($(compgen -f -- "$cur"))
            else
                COMPREPLY=($(compgen -W "--iso --console --vnc --no-block --help
                                         $(_kvmagent_guests)" -- "$cur"))
            fi ;;
        list) COMPREPLY=($(compgen -W "--json -H --help" -- "$cur")) ;;
        bridge)
            if ((COMP_CWORD == i + 1)); then
                COMPREPLY=($(compgen -W "ensure show --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "--uplink --address --persist --all --json --help" -- "$cur"))
            fi ;;
    esac
}
complete -F _kvmagent kvmagent
