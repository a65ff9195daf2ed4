# bash completion for qbrokerctl. qbrokerctl answers it itself (`qbrokerctl __complete WORDS`),
# so commands and flags are those its parser knows and domain names those the broker lists
# (through --socket or $QBROKER_SOCKET when the command line gives one).
_qbrokerctl() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  local -a reply
  mapfile -t reply < <("${COMP_WORDS[0]}" __complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null)
  ((${#reply[@]})) || return 0
  local kind=${reply[0]} word
  COMPREPLY=()
  for word in "${reply[@]:1}"; do
    [[ $word == "$cur"* ]] && COMPREPLY+=("$word")
  done
  if [[ $kind == files ]]; then
    compopt -o filenames 2>/dev/null
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -f -- "$cur")
  fi
  return 0
}
complete -F _qbrokerctl qbrokerctl
