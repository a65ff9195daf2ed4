// Bash completion for qbrokerctl, answered by qbrokerctl itself (`qbrokerctl __complete WORDS`,
// called by ctl/qbrokerctl.bash), so that it knows exactly the commands and flags the parser
// knows (cli.cpp's tables) and the domains the broker has. Pure: the domain names come from a
// function the caller passes, which asks the API.
#pragma once

#include <functional>
#include <span>
#include <string>
#include <vector>

namespace qbctl {

struct Completion {
  std::vector<std::string> words;  // candidates; the shell keeps those the current word starts
  bool files = false;              // complete file names as well
};

// What `socket` lists in GET /v1/domains; empty when it does not answer.
using DomainLister = std::function<std::vector<std::string>(const std::string& socket)>;

// `words`: the command line after "qbrokerctl", the last one being the word being completed
// (possibly empty). `env_socket` is $QBROKER_SOCKET.
Completion complete(std::span<const std::string> words, const std::string& env_socket,
                    const DomainLister& domains);

}  // namespace qbctl
