#include "broker/lifecycle/fd_handover.hpp"

#include <cassert>

namespace broker::lifecycle {

std::size_t FdHandover::add_to_fdset(fdpass::UniqueFd fd, std::string opaque,
                                     std::optional<std::int64_t> fdset) {
  entries_.push_back(Entry{Kind::fdset, std::move(fd), std::move(opaque), fdset, false});
  return entries_.size() - 1;
}

std::size_t FdHandover::add_named(fdpass::UniqueFd fd, std::string name) {
  entries_.push_back(Entry{Kind::named, std::move(fd), std::move(name), std::nullopt, false});
  return entries_.size() - 1;
}

std::vector<std::string> FdHandover::spawn_args(int first_fd) const {
  std::vector<std::string> args;
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    // The command line can only put fds into fdsets, and only into ones it names.
    assert(e.kind == Kind::fdset && e.fdset);
    args.push_back("-add-fd");
    args.push_back("fd=" + std::to_string(first_fd + static_cast<int>(i)) +
                   ",set=" + std::to_string(*e.fdset) + (e.name.empty() ? "" : ",opaque=" + e.name));
  }
  return args;
}

std::vector<fdpass::BorrowedFd> FdHandover::spawn_fds() const {
  std::vector<fdpass::BorrowedFd> fds;
  for (const auto& e : entries_) fds.push_back(e.fd);
  return fds;
}

void FdHandover::spawned() {
  for (auto& e : entries_) {
    e.in_qemu = true;
    e.fd.reset();
  }
}

void FdHandover::taken(std::size_t i, std::optional<std::int64_t> fdset) {
  Entry& e = entries_.at(i);
  e.in_qemu = true;
  if (fdset) e.fdset = fdset;
  e.fd.reset();
}

std::vector<qmp::Command> FdHandover::rollback() const {
  std::vector<qmp::Command> out;
  for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {
    if (!it->in_qemu) continue;
    if (it->kind == Kind::named) {
      out.push_back(qmp::cmd::closefd(it->name));
    } else if (it->fdset) {
      out.push_back(qmp::cmd::remove_fd(*it->fdset));
    }
  }
  return out;
}

void FdHandover::taken_back() {
  for (auto& e : entries_) e.in_qemu = false;
}

}  // namespace broker::lifecycle
