// The fds of one QEMU object on their way into QEMU, as libvirt's qemu_fd.c passes them. Each fd
// goes either into an fdset (block images and CD media, which QEMU reads as /dev/fdset/N) or under
// a name given with getfd (taps, VNC listeners). The same value goes to the command line at spawn
// (-add-fd) or over QMP at run time (add-fd, getfd; broker/flows sends it), remembers what QEMU
// took, and says in one place how to take it back (remove-fd, closefd).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fdpass/unique_fd.hpp"
#include "qmp/commands.hpp"

namespace broker::lifecycle {

class FdHandover {
 public:
  enum class Kind { fdset, named };
  struct Entry {
    Kind kind = Kind::fdset;
    fdpass::UniqueFd fd;                // the broker's copy, closed once QEMU holds the fd
    std::string name;                   // fdset: the opaque ("qb:d0"); named: the getfd name
    std::optional<std::int64_t> fdset;  // fdset: chosen by the caller, or given by QEMU at add-fd
    bool in_qemu = false;
  };

  // An fd for an fdset named by `opaque`. At spawn `fdset` must be given (-add-fd needs a set);
  // at run time QEMU picks one when it is not. Returns the entry's index.
  std::size_t add_to_fdset(fdpass::UniqueFd fd, std::string opaque,
                           std::optional<std::int64_t> fdset = std::nullopt);
  // An fd QEMU will know as `name` (getfd). Returns the entry's index.
  std::size_t add_named(fdpass::UniqueFd fd, std::string name);

  // Spawn: the -add-fd arguments for the fds placed in the child at first_fd, first_fd+1, ...
  // in entry order (every entry an fdset with its id set), and the fds to place there.
  std::vector<std::string> spawn_args(int first_fd) const;
  std::vector<fdpass::BorrowedFd> spawn_fds() const;
  // The spawned QEMU holds every fd: the broker's copies are closed.
  void spawned();

  // Run time: QEMU took entry `i` (into fdset `fdset` for add-fd); the broker's copy is closed.
  void taken(std::size_t i, std::optional<std::int64_t> fdset = std::nullopt);

  // The commands that take back every fd QEMU holds of this object, newest first.
  std::vector<qmp::Command> rollback() const;
  // The rollback ran: QEMU holds none of these fds any more.
  void taken_back();

  std::vector<Entry>& entries() { return entries_; }
  const std::vector<Entry>& entries() const { return entries_; }
  // The fdset of entry `i` (-1 before QEMU took it at run time).
  std::int64_t fdset(std::size_t i) const { return entries_.at(i).fdset.value_or(-1); }

 private:
  std::vector<Entry> entries_;
};

}  // namespace broker::lifecycle
