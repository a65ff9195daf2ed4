// QMP write side, without I/O: the commands not yet written, and the one being written.
//
// The shell (qmp::Client) asks next_write() what to send, sends it with one sendmsg, and reports
// how many bytes went out with commit_write(). It never decides anything about order or fds:
//  - Order. Commands go out in push order, whole, one after the other. Nothing overtakes a
//    command that is held (see the fd gate), so QEMU executes them in the order they were pushed.
//  - Ids. In IdMode::wire a command's line is completed with its id when it becomes the next to
//    write, so ids follow send order with no gaps; in IdMode::positional lines carry no id.
//  - Short writes. The fd, if any, goes with the first byte of its command. Once that byte went
//    out the kernel holds the fd (SCM_RIGHTS on a stream socket travels with the first byte of
//    the data it was sent with), so the rest of the line is offered without it, and the outbox
//    closes its own copy. The command counts as written (issued to the Mux) from its first byte.
//  - The fd gate. QEMU keeps one pending fd per monitor and a second fd replaces the first, so an
//    fd-carrying command is held while an earlier one has not been answered (Mux::fd_in_flight,
//    which stays true when the earlier waiter gave up). Everything pushed after it waits behind
//    it, plain commands included: letting them pass would reorder execution.
//  - Giving up. cancel() removes a command none of whose bytes went out (it is never sent, and its
//    fd is closed); once a byte went out the command has to be written to the end, and abandon()
//    marks it in the Mux so its late reply is dropped.
//  - close() hands back every command still waiting (written ones first, then the unwritten, each
//    in send order), closes every fd not yet sent and forgets a partly written line.
//
// Replies go through on_reply(), which completes the Mux and so may open the fd gate: the shell
// calls next_write() again after each reply when writable() says there is something to send.
// Slot is a small copyable handle (a pointer to the waiter, in the client).
#pragma once

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "fdpass/unique_fd.hpp"
#include "qmp/mux.hpp"
#include "qmp/wire.hpp"

namespace qmp {

template <class Slot>
class Outbox {
 public:
  using Id = typename Mux<Slot>::Id;
  using Ticket = std::uint64_t;  // names a command from push() until it is written
  using Dispatch = typename Mux<Slot>::Dispatch;
  using Outcome = typename Mux<Slot>::Outcome;

  // What to send now: `bytes` in one send, with `fd` attached when it is valid.
  struct Write {
    std::string_view bytes;
    fdpass::BorrowedFd fd;
  };

  // A command whose first byte has just gone out. `line` (without its "\n") stays valid until
  // the next call of any member.
  struct Issued {
    Ticket ticket;
    Id id;
    Slot slot;
    bool with_fd;
    std::string_view line;
  };

  explicit Outbox(IdMode mode = IdMode::positional, std::size_t max_abandoned = 256)
      : mux_(mode, max_abandoned) {}
  Outbox(const Outbox&) = delete;
  Outbox& operator=(const Outbox&) = delete;

  // Queues a command, with an fd when `fd` is valid (it is sent with the command's first byte).
  Ticket push(EncodedCommand cmd, Slot slot, fdpass::UniqueFd fd = {}) {
    queue_.push_back(Queued{next_ticket_, std::move(cmd), std::move(slot), std::move(fd)});
    return next_ticket_++;
  }

  // The bytes to send next, or nothing when the queue is empty or its head is held at the fd
  // gate. Asking again without a commit_write() returns the same bytes.
  std::optional<Write> next_write() {
    if (!staged()) {
      unstage();
      if (queue_.empty()) return std::nullopt;
      if (queue_.front().fd.valid() && mux_.fd_in_flight()) return std::nullopt;
      stage(queue_.front());
    }
    std::string_view rest = std::string_view(line_).substr(off_);
    if (off_ > 0) return Write{rest, {}};
    return Write{rest, queue_.front().fd.borrow()};
  }

  // `n` bytes (at least one) of the last next_write() went out. When they were the first bytes
  // of a command, the command is now written: it is registered with the Mux, its fd is closed
  // (the kernel holds it now) and it is returned.
  std::optional<Issued> commit_write(std::size_t n) {
    assert(staged() && n > 0 && n <= line_.size() - off_);
    std::optional<Issued> issued;
    if (off_ == 0) issued = issue();
    off_ += n;
    return issued;
  }

  // Removes a command none of whose bytes went out and closes its fd. False when it is not
  // queued (already written, cancelled, or never pushed).
  bool cancel(Ticket t) {
    auto it = std::lower_bound(queue_.begin(), queue_.end(), t,
                               [](const Queued& q, Ticket v) { return q.ticket < v; });
    if (it == queue_.end() || it->ticket != t) return false;
    // A staged line with no bytes out is the head's; drop it with the command.
    if (it == queue_.begin() && staged() && off_ == 0) unstage();
    queue_.erase(it);
    return true;
  }

  // The waiter of a written command gave up: its reply will be dropped (see Mux::abandon).
  bool abandon(Id id) { return mux_.abandon(id); }
  bool unresponsive() const noexcept { return mux_.unresponsive(); }

  // Matches a reply (see Mux::on_reply). Answering an fd-carrying command opens the gate.
  Dispatch on_reply(const ReplyId& rid, bool is_error) { return mux_.on_reply(rid, is_error); }

  // True when next_write() has something to send.
  bool writable() const noexcept {
    if (staged()) return true;
    return !queue_.empty() && !(queue_.front().fd.valid() && mux_.fd_in_flight());
  }

  // Empties the outbox: calls f(slot) for every command not answered, written ones first, then
  // unwritten ones, each in send order, and closes every fd not yet sent. Ids are not reused.
  template <class F>
  void close(F&& f) {
    std::deque<Queued> queued;
    queued.swap(queue_);
    std::string().swap(line_);
    off_ = 0;
    mux_.drain([&](Id, Slot& s) { f(s); });
    for (Queued& q : queued) {
      q.fd.reset();
      f(q.slot);
    }
  }

  std::size_t queued() const noexcept { return queue_.size(); }
  // True while a line is partly written: the next write must finish it.
  bool mid_line() const noexcept { return staged() && off_ > 0; }
  bool fd_in_flight() const noexcept { return mux_.fd_in_flight(); }
  // The write buffer's size: one line at most, given back after a line over 64 KiB.
  std::size_t buffer_capacity() const noexcept { return line_.capacity(); }
  const Mux<Slot>& mux() const noexcept { return mux_; }

 private:
  struct Queued {
    Ticket ticket;
    EncodedCommand cmd;
    Slot slot;
    fdpass::UniqueFd fd;
  };

  // A line is staged while it is the one being written: the queue's head before its first byte
  // went out, the tail of an issued command after. A line written to the end stays in line_
  // (Issued::line points into it) until the next next_write() clears it.
  bool staged() const noexcept { return off_ < line_.size(); }

  void stage(const Queued& q) {
    line_ = q.cmd.line(mux_.mode() == IdMode::wire ? std::optional(mux_.next_id()) : std::nullopt);
    off_ = 0;
  }

  void unstage() {
    // Keep the buffer for the next line unless one huge command grew it.
    // (Assigning an empty string would keep the capacity: swap it away.)
    if (line_.capacity() > 64 * 1024) {
      std::string().swap(line_);
    } else {
      line_.clear();
    }
    off_ = 0;
  }

  Issued issue() {
    Queued q = std::move(queue_.front());
    queue_.pop_front();
    const bool with_fd = q.fd.valid();
    q.fd.reset();  // sent: the peer's copy is in flight, ours is no longer needed
    Id id = mux_.issue(q.slot, with_fd);
    std::string_view line(line_);
    return Issued{q.ticket, id, std::move(q.slot), with_fd, line.substr(0, line.size() - 1)};
  }

  Mux<Slot> mux_;
  std::deque<Queued> queue_;  // not yet written, in push order (so sorted by ticket)
  std::string line_;          // the line being written (see staged())
  std::size_t off_ = 0;       // bytes of line_ already sent
  Ticket next_ticket_ = 1;
};

}  // namespace qmp
