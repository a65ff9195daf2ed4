// QMP id multiplexer, without I/O.
//
// Every command gets an id, in send order, when it is written, and is registered here. QEMU
// answers commands strictly in order and exactly once each (the client never enables
// out-of-band execution), so replies can be matched two ways:
//  - IdMode::positional (default): commands go out without an id and each reply completes the
//    oldest command not yet answered. QEMU reads monitor input one byte per main-loop iteration,
//    so the 7+ bytes of an id cost measurable latency on every command.
//    A reply that carries an id answers nothing of ours. An extra reply from a misbehaving peer
//    is recognised only when nothing is outstanding; otherwise it answers the next command (a
//    peer that misbehaves can as well lie in that command's own reply).
//  - IdMode::wire: commands carry their id and replies are matched by it (also out of order).
//    A reply whose id is foreign (not a number we use), never issued or already answered is
//    dropped and counted, so duplicates are always recognised.
//
// A command whose waiter gave up (deadline, cancellation) is *abandoned*: it keeps its place,
// without its slot, until its late reply comes, and that reply is dropped. Abandoned commands
// are bounded: past the bound QEMU has left that many commands unanswered, unresponsive() turns
// true and the client closes the connection (forgetting one would shift every later match).
//
// Replies without an id: besides every reply in positional mode, QEMU omits the id only when it
// could not read a command far enough to find one (a JSON syntax error, nesting over 1024, an
// oversized token). encode_command() never produces such input, so in wire mode this means the
// stream was damaged or the peer misbehaves. As QEMU answers in order, an error without an id
// belongs to the oldest command not yet answered: that command fails with the error (class and
// desc kept). With nothing outstanding it is counted and dropped. In wire mode a *success*
// without an id cannot answer any command of ours and is counted and dropped.
//
// At most one fd-carrying command is in flight: QEMU keeps a single pending fd per monitor and an
// fd that arrives while an earlier one is unconsumed replaces it. fd_in_flight() stays true until
// the reply of the last fd-carrying command arrives, even when its waiter has given up; while it
// is, qmp::Outbox (qmp/outbox.hpp) holds the next fd-carrying command back.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <utility>

#include "qmp/wire.hpp"

namespace qmp {

struct MuxCounters {
  std::uint64_t issued = 0;
  std::uint64_t completed = 0;          // replies delivered to a waiter
  std::uint64_t dropped_abandoned = 0;  // late replies of abandoned commands
  std::uint64_t dropped_unmatched = 0;  // replies for no command of ours
  std::uint64_t id_less_errors = 0;     // wire mode: errors without an id (matched or not)
};

enum class IdMode { positional, wire };

template <class Slot>
class Mux {
 public:
  using Id = std::uint64_t;

  enum class Outcome { complete, dropped_abandoned, dropped_unmatched };
  struct Dispatch {
    Outcome outcome;
    Id id = 0;
    std::optional<Slot> slot;  // set for Outcome::complete
  };

  explicit Mux(IdMode mode = IdMode::positional, std::size_t max_abandoned = 256)
      : mode_(mode), max_abandoned_(max_abandoned) {}

  IdMode mode() const noexcept { return mode_; }

  // The id the next issue() will return, to serialize the command before it is written.
  Id next_id() const noexcept { return next_id_; }

  // Registers a command that has been (at least partly) written.
  Id issue(Slot slot, bool carries_fd) {
    Id id = next_id_++;
    entries_.push_back(Entry{id, false, carries_fd, std::move(slot)});
    if (carries_fd) ++fd_outstanding_;
    ++counters_.issued;
    return id;
  }

  // The waiter of `id` gave up. Returns false when `id` is not pending.
  bool abandon(Id id) {
    auto it = find(id);
    if (it == entries_.end() || it->abandoned) return false;
    it->abandoned = true;
    it->slot.reset();
    ++abandoned_;
    return true;
  }

  // More commands are abandoned than the bound allows: QEMU has stopped answering.
  bool unresponsive() const noexcept { return abandoned_ > max_abandoned_; }

  Dispatch on_reply(const ReplyId& rid, bool is_error) {
    auto it = entries_.end();
    if (rid.kind == ReplyId::Kind::absent) {
      if (mode_ == IdMode::wire && is_error) ++counters_.id_less_errors;
      if (mode_ == IdMode::positional || is_error) it = entries_.begin();
    } else if (rid.kind == ReplyId::Kind::number && mode_ == IdMode::wire) {
      it = find(rid.number);
    }
    if (it == entries_.end()) {
      ++counters_.dropped_unmatched;
      return {Outcome::dropped_unmatched, rid.number, std::nullopt};
    }
    Entry e = std::move(*it);
    erase(it);
    if (e.abandoned) {
      ++counters_.dropped_abandoned;
      return {Outcome::dropped_abandoned, e.id, std::nullopt};
    }
    ++counters_.completed;
    return {Outcome::complete, e.id, std::move(e.slot)};
  }

  // Removes every command; calls f(id, slot) for each one still pending (in send order).
  template <class F>
  void drain(F&& f) {
    std::deque<Entry> all;
    all.swap(entries_);
    abandoned_ = 0;
    fd_outstanding_ = 0;
    for (Entry& e : all) {
      if (!e.abandoned) f(e.id, *e.slot);
    }
  }

  bool fd_in_flight() const noexcept { return fd_outstanding_ > 0; }
  std::size_t pending() const noexcept { return entries_.size() - abandoned_; }
  std::size_t abandoned() const noexcept { return abandoned_; }
  const MuxCounters& counters() const noexcept { return counters_; }

 private:
  struct Entry {
    Id id;
    bool abandoned;
    bool carries_fd;
    std::optional<Slot> slot;
  };

  // Ids are issued in increasing order, so the table is sorted.
  typename std::deque<Entry>::iterator find(Id id) {
    auto it = std::lower_bound(entries_.begin(), entries_.end(), id,
                               [](const Entry& e, Id v) { return e.id < v; });
    return it != entries_.end() && it->id == id ? it : entries_.end();
  }

  void erase(typename std::deque<Entry>::iterator it) {
    if (it->abandoned) --abandoned_;
    if (it->carries_fd) --fd_outstanding_;
    entries_.erase(it);
  }

  IdMode mode_;
  std::size_t max_abandoned_;
  Id next_id_ = 1;
  std::deque<Entry> entries_;
  std::size_t abandoned_ = 0;
  std::size_t fd_outstanding_ = 0;
  MuxCounters counters_;
};

}  // namespace qmp
