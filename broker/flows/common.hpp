// What every flow shares (private to broker/flows): QMP calls with the flow deadline, fd hand-over
// (add-fd, getfd), the undo list that rolls back completed steps, the mapping of opener and QEMU
// errors to broker errors, and the image header checks done before QEMU is touched.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/json/value.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/names.hpp"
#include "broker/domain/qmp_call.hpp"
#include "broker/flows/flows.hpp"
#include "broker/lifecycle/fd_handover.hpp"
#include "fdpass/unique_fd.hpp"
#include "qmp/commands.hpp"
#include "qmp/error.hpp"

namespace broker::flows::detail {

// Names inside QEMU have one owner, broker/domain/names.hpp.
using namespace broker::names;

// An opener refusal (fdpass::errc or errno) for the user's `field`: invalid_argument naming the
// field and the path, with the opener's reason.
Error from_open(std::error_code ec, std::string_view field, std::string_view path);

// g++ 12 mis-destroys temporaries that live across a co_await (an aggregate bound to a const&
// parameter, a std::string behind a string_view): every awaited call here gets named values,
// and commands are built into locals before they are awaited.

// One command, deadline ctx.timeouts.qmp.
boost::asio::awaitable<Result<boost::json::value>> call(Context& ctx, Domain& d, qmp::Command c);
// add-fd with `fd` attached; the new fdset's id.
boost::asio::awaitable<Result<std::int64_t>> add_fd(Context& ctx, Domain& d, fdpass::BorrowedFd fd,
                                                    std::string opaque);
// getfd NAME with `fd` attached.
boost::asio::awaitable<Result<void>> getfd(Context& ctx, Domain& d, fdpass::BorrowedFd fd,
                                           std::string name);

// Hands every fd of `fds` that QEMU does not hold yet over QMP, one message each: add-fd for an
// fdset entry (recording the fdset QEMU gives), getfd for a named one. On a failure, takes back
// every fd of `fds` QEMU holds and returns the error; after a success the caller's undo list
// takes fds.rollback().
boost::asio::awaitable<Result<void>> hand_over(Context& ctx, Domain& d, lifecycle::FdHandover& fds);

// Checks that `id` can name a new device of `d`: unused, and not one of the broker's own names.
Result<void> check_new_id(const Domain& d, const std::string& id);

// Waits for DEVICE_DELETED of `id` on `sub` (subscribed before device_del) until `timeout`,
// reporting the wait through `progress` about once a second. guest_timeout when it never came.
boost::asio::awaitable<Result<void>> wait_deleted(Context& ctx, qmp::EventSubscription& sub,
                                                  std::string id, std::string what,
                                                  ProgressFn progress);

// blockdev-del of `node`, counting a node already gone as deleted (a retry after a partial unplug)
// and retrying, within timeouts.unplug, one still in use: a device whose unplug QEMU reported
// done may hold its drive until it is finalized a moment later.
boost::asio::awaitable<Result<void>> delete_node(Context& ctx, Domain& d, std::string node);

// device_del, tolerating a device the guest already released (a previous unplug that timed out
// and completed later) and one already being unplugged. Returns false when the device is gone.
boost::asio::awaitable<Result<bool>> device_del(Context& ctx, Domain& d, std::string id);

// device_del, then (unless the device was already gone) the wait for the guest to release it:
// the first half of every unplug. `what` names the device in messages ("disk d1").
boost::asio::awaitable<Result<void>> unplug(Context& ctx, Domain& d, std::string id,
                                            std::string what, ProgressFn progress);

// not_found for an unknown device id of kind `kind` ("disk", "NIC").
Error no_such_device(const Domain& d, std::string_view kind, const std::string& id);

// Plugs the domain's virtio-scsi controller on a free root port unless it is there. It stays for
// the domain's lifetime (every SCSI disk and CD hangs off it), so no flow rolls it back.
boost::asio::awaitable<Result<void>> ensure_scsi_controller(Context& ctx, Domain& d);

// Steps to undo, run in reverse order when a later step fails. Each step is one QMP command or
// one root port to give back. Undo is best effort: a failing undo step is logged and the rest
// still run, since QEMU may have lost the object on its own (a consumed getfd name).
class Undo {
 public:
  void push(qmp::Command c) { steps_.push_back(Step{std::move(c), {}}); }
  void push_slot(std::string slot) { steps_.push_back(Step{std::nullopt, std::move(slot)}); }
  // Every step of `cmds`, the first undone last.
  void push_all(std::vector<qmp::Command> cmds) {
    for (auto it = cmds.rbegin(); it != cmds.rend(); ++it) push(std::move(*it));
  }
  // Forgets the last step: the object it undid is gone or owned by a later one.
  void pop() { steps_.pop_back(); }
  void commit() { steps_.clear(); }
  bool empty() const { return steps_.empty(); }

  boost::asio::awaitable<void> run(Context& ctx, Domain& d);
  // run(), then returns `e`, so a failing step reads `co_return co_await undo.fail(...)`.
  boost::asio::awaitable<Error> fail(Context& ctx, Domain& d, Error e);

 private:
  struct Step {
    std::optional<qmp::Command> cmd;
    std::string slot;
  };
  std::vector<Step> steps_;
};

// What the first bytes of an image say about its format.
struct ImageHeader {
  bool qcow2 = false;
  bool backing_file = false;   // qcow2: the header names a backing file
  bool external_data = false;  // qcow2: incompatible feature "external data file"
};
Result<ImageHeader> read_header(fdpass::BorrowedFd fd, std::string_view field);

// Refuses an image whose header contradicts `format` (or, for qcow2, whose backing does not match
// what the caller gave, or which keeps its data in an external file QEMU would open by path).
Result<void> check_format(const ImageHeader& h, DiskFormat format, bool backing_given);

}  // namespace broker::flows::detail
