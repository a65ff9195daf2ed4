#include "broker/xen/devices_state.hpp"

#include "broker/domain/qmp_call.hpp"
#include "qmp/commands.hpp"

namespace broker::xen {
namespace {

using boost::asio::awaitable;

// Passes `file` in a new fdset, runs `command` with {"filename": "/dev/fdset/N"} plus `args`,
// and removes the fdset.
awaitable<Result<void>> with_fdset(qmp::Client& qmp, fdpass::BorrowedFd file, std::string name,
                                   boost::json::object args, qmp::Deadline deadline) {
  auto added = co_await qmp.execute_with_fd(qmp::cmd::add_fd(), file, deadline);
  if (!added) co_return from_qmp(added.error(), name + ": add-fd");
  auto info = qmp::reply::add_fd(*added);
  if (!info) co_return from_qmp(info.error(), name + ": add-fd reply");
  args["filename"] = qmp::cmd::fdset_path(info->fdset_id);
  qmp::Command command{name, std::move(args), false};
  auto done = co_await qmp.execute(std::move(command), deadline);
  auto removed = co_await qmp.execute(qmp::cmd::remove_fd(info->fdset_id), deadline);
  if (!done) co_return from_qmp(done.error(), name);
  if (!removed) co_return from_qmp(removed.error(), name + ": remove-fd");
  co_return Result<void>();
}

}  // namespace

awaitable<Result<void>> save_devices_state(qmp::Client& qmp, fdpass::BorrowedFd file, bool live,
                                           qmp::Deadline deadline) {
  boost::json::object args{{"live", live}};
  co_return co_await with_fdset(qmp, file, "xen-save-devices-state", std::move(args), deadline);
}

awaitable<Result<void>> load_devices_state(qmp::Client& qmp, fdpass::BorrowedFd file,
                                           qmp::Deadline deadline) {
  co_return co_await with_fdset(qmp, file, "xen-load-devices-state", {}, deadline);
}

}  // namespace broker::xen
