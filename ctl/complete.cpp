#include "ctl/complete.hpp"

#include <algorithm>
#include <set>
#include <string_view>

#include "ctl/cli.hpp"

namespace qbctl {
namespace {

bool is_flag(std::string_view w) {
  return w.size() >= 2 && w[0] == '-';
}

const GlobalFlag* global(std::string_view w) {
  if (w == "-h") w = "--help";
  for (const auto& f : global_flags()) {
    if (f.name == w) return &f;
  }
  return nullptr;
}

bool global_takes_value(std::string_view w) {
  const auto* f = global(w);
  return f != nullptr && !f->arg.empty();
}

// The socket the command line names, as the parser would take it.
std::string socket_of(std::span<const std::string> words, const std::string& env_socket) {
  std::string socket = env_socket.empty() ? "/run/qbroker/qbroker.sock" : env_socket;
  for (std::size_t i = 0; i < words.size(); ++i) {
    if (words[i].starts_with("--socket=")) socket = words[i].substr(9);
    if (words[i] == "--socket" && i + 1 < words.size()) socket = words[++i];
  }
  return socket;
}

const SyntaxInfo* find_syntax(const std::vector<SyntaxInfo>& all, std::string_view words) {
  auto it = std::find_if(all.begin(), all.end(), [&](const auto& s) { return s.words == words; });
  return it == all.end() ? nullptr : &*it;
}

// The first words of the commands ("cdrom" once for its verbs), with "domain" and "help".
Completion command_words(const std::vector<SyntaxInfo>& all) {
  std::set<std::string> words{"domain", "help"};
  for (const auto& s : all) words.emplace(s.words.substr(0, s.words.find(' ')));
  return {{words.begin(), words.end()}};
}

// The verbs of a device group ("cdrom" -> insert, eject), or of `domain`.
Completion second_words(const std::vector<SyntaxInfo>& all, std::string_view group) {
  Completion out;
  for (const auto& s : all) {
    if (group == "domain" && s.domain_alias) out.words.emplace_back(s.words);
    std::string prefix = std::string(group) + " ";
    if (s.words.starts_with(prefix)) out.words.emplace_back(s.words.substr(prefix.size()));
  }
  return out;
}

bool is_group(const std::vector<SyntaxInfo>& all, std::string_view word) {
  return std::any_of(all.begin(), all.end(), [&](const auto& s) {
    return s.words.size() > word.size() && s.words.starts_with(word) && s.words[word.size()] == ' ';
  });
}

// The value a flag takes, as --help writes it: "[--format raw|qcow2]" in the command's synopsis
// or the global flag's argument name.
std::string value_name(std::string_view command, std::string_view flag) {
  if (const auto* g = global(flag)) return std::string(g->arg);
  for (const auto& c : command_table()) {
    if (c.words != command) continue;
    std::string key = "[" + std::string(flag) + " ";
    auto at = c.args.find(key);
    if (at == std::string_view::npos) return {};
    auto from = at + key.size();
    return std::string(c.args.substr(from, c.args.find(']', from) - from));
  }
  return {};
}

Completion flag_value(std::string_view command, std::string_view flag, const std::string& socket,
                      const DomainLister& domains) {
  if (flag == "--domain") return {domains(socket)};
  std::string name = value_name(command, flag);
  if (name.find("PATH") != std::string::npos || name.find("FILE") != std::string::npos)
    return {{}, true};
  // A choice of lowercase words: "raw|qcow2".
  bool choice =
      name.find('|') != std::string::npos && std::all_of(name.begin(), name.end(), [](char c) {
        return c == '|' || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
      });
  Completion out;
  for (std::size_t from = 0; choice && from <= name.size();) {
    auto bar = std::min(name.find('|', from), name.size());
    out.words.push_back(name.substr(from, bar - from));
    from = bar + 1;
  }
  return out;
}

Completion flag_names(const SyntaxInfo* syntax) {
  Completion out;
  for (const auto& f : global_flags()) out.words.emplace_back(f.name);
  if (syntax == nullptr) return out;
  for (const auto& f : syntax->flags) out.words.emplace_back(f.name);
  return out;
}

// A positional argument: a domain's name (except a new one), or a host path.
Completion positional(const SyntaxInfo& syntax, std::size_t index, const std::string& socket,
                      const DomainLister& domains) {
  if (index >= syntax.positional.size()) return {};
  auto name = syntax.positional[index];
  if (name == "NAME" && syntax.words != "create" && syntax.words != "restore")
    return {domains(socket)};
  if (name == "PATH") return {{}, true};
  if (name == "TO") return {{"local"}};
  return {};
}

}  // namespace

Completion complete(std::span<const std::string> words, const std::string& env_socket,
                    const DomainLister& domains) {
  if (words.empty()) return {};
  const std::string& cur = words.back();
  auto before = words.first(words.size() - 1);
  const std::string socket = socket_of(before, env_socket);
  const auto all = syntax_table();

  std::size_t i = 0;
  for (; i < before.size() && is_flag(before[i]); ++i) {
    if (!global_takes_value(before[i])) continue;
    if (i + 1 == before.size()) return flag_value({}, before[i], socket, domains);
    ++i;
  }
  // A lone "-" is an argument (stdin) once typed, but the start of a flag while it is typed.
  const bool typing_flag = cur.starts_with("-");
  if (i == before.size()) return typing_flag ? flag_names(nullptr) : command_words(all);
  std::string command = before[i++];
  if (command == "help") return command_words(all);
  if (command == "domain" || is_group(all, command)) {
    if (i == before.size()) return second_words(all, command);
    command = command == "domain" ? before[i++] : command + " " + before[i++];
  }
  const SyntaxInfo* syntax = find_syntax(all, command);
  if (syntax == nullptr) return {};

  std::size_t args = 0;
  for (; i < before.size(); ++i) {
    const std::string& w = before[i];
    if (!is_flag(w)) {
      ++args;
      continue;
    }
    auto spec = std::find_if(syntax->flags.begin(), syntax->flags.end(),
                             [&](const FlagSpec& f) { return f.name == w; });
    bool value = global_takes_value(w) || (spec != syntax->flags.end() && spec->value);
    if (!value) continue;
    if (i + 1 == before.size()) return flag_value(command, w, socket, domains);
    ++i;
  }
  if (typing_flag) return flag_names(syntax);
  return positional(*syntax, args, socket, domains);
}

}  // namespace qbctl
