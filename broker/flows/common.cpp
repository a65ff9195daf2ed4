#include "broker/flows/common.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "fdpass/errc.hpp"
#include "qmp/client.hpp"

namespace broker::flows::detail {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;

Error from_open(std::error_code ec, std::string_view field, std::string_view path) {
  std::string f(field);
  std::string why = ec.message();
  if (ec == fdpass::errc::diskseq_mismatch) f = "diskseq";
  if (ec == fdpass::errc::invalid_argument) {
    f = "diskseq";
    why = "a disk sequence number was given but the path is not a block device";
  }
  // The opener's own code (outside_roots, symlink, is_fifo, ...) reaches the caller; only the
  // diskseq misuse is a plain invalid argument.
  if (ec != fdpass::errc::invalid_argument) {
    Error e(ec, f + ": " + std::string(path));  // describe() adds the opener's reason
    e.field = f;
    return e;
  }
  Error e(make_error_code(errc::invalid_argument), f + ": " + std::string(path) + ": " + why);
  e.field = f;
  return e;
}

awaitable<Result<json::value>> call(Context& ctx, Domain& d, qmp::Command c) {
  if (d.cold_plan) {
    if (auto ok = d.cold_plan->add(c); !ok) co_return ok.error();
    co_return json::value(json::object{});
  }
  co_return co_await qmp_call(d, std::move(c), ctx.timeouts.qmp);
}

awaitable<Result<std::int64_t>> add_fd(Context& ctx, Domain& d, fdpass::BorrowedFd fd,
                                       std::string opaque) {
  if (d.cold_plan) co_return d.cold_plan->add_fd(fd, std::move(opaque));
  auto q = qmp_client(d);
  if (!q) co_return q.error();
  qmp::Command c = qmp::cmd::add_fd(std::nullopt, opaque);
  auto r = co_await (*q)->execute_with_fd(std::move(c), fd, qmp::after(ctx.timeouts.qmp));
  if (!r) co_return from_qmp(r.error(), "domain " + d.name());
  auto info = qmp::reply::add_fd(*r);
  if (!info) co_return from_qmp(info.error(), "domain " + d.name());
  co_return info->fdset_id;
}

awaitable<Result<void>> getfd(Context& ctx, Domain& d, fdpass::BorrowedFd fd, std::string name) {
  auto q = qmp_client(d);
  if (!q) co_return q.error();
  qmp::Command c = qmp::cmd::getfd(name);
  auto r = co_await (*q)->execute_with_fd(std::move(c), fd, qmp::after(ctx.timeouts.qmp));
  if (!r) co_return from_qmp(r.error(), "domain " + d.name());
  co_return Result<void>{};
}

namespace {

// Sends entry `e` of a handover: getfd for a named fd, add-fd for an fdset (whose id it returns).
awaitable<Result<std::optional<std::int64_t>>> send_one(Context& ctx, Domain& d,
                                                        lifecycle::FdHandover::Entry& e) {
  std::string name = e.name;
  if (e.kind == lifecycle::FdHandover::Kind::named) {
    auto sent = co_await getfd(ctx, d, e.fd, std::move(name));
    if (!sent) co_return sent.error();
    co_return std::nullopt;
  }
  auto set = co_await add_fd(ctx, d, e.fd, std::move(name));
  if (!set) co_return set.error();
  co_return *set;
}

}  // namespace

awaitable<Result<void>> hand_over(Context& ctx, Domain& d, lifecycle::FdHandover& fds) {
  for (std::size_t i = 0; i < fds.entries().size(); ++i) {
    if (fds.entries()[i].in_qemu) continue;
    auto sent = co_await send_one(ctx, d, fds.entries()[i]);
    if (sent) {
      fds.taken(i, *sent);
      continue;
    }
    Undo undo;
    undo.push_all(fds.rollback());
    fds.taken_back();
    co_return co_await undo.fail(ctx, d, sent.error());
  }
  co_return Result<void>{};
}

Result<void> check_new_id(const Domain& d, const std::string& id) {
  if (d.has_device(id)) {
    Error e(make_error_code(errc::already_exists),
            "id: domain " + d.name() + " already has a device named '" + id + "'");
    e.field = "id";
    return e;
  }
  if (id.rfind("qb-", 0) == 0) {
    return field_error("id", "'" + id + "': the prefix qb- is reserved for the broker's own objects");
  }
  if (id.size() > 2 && id.rfind("rp", 0) == 0 &&
      std::all_of(id.begin() + 2, id.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return field_error("id", "'" + id + "' names one of the domain's PCIe root ports");
  }
  return {};
}

awaitable<Result<void>> wait_deleted(Context& ctx, qmp::EventSubscription& sub, std::string id,
                                     std::string what, ProgressFn progress) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + ctx.timeouts.unplug;
  const std::string phase = "waiting for the guest to release " + what;
  if (progress) progress(0.0, phase);
  for (;;) {
    auto slice = std::min(deadline, Clock::now() + std::chrono::seconds(1));
    qmp::event::Predicate deleted = qmp::event::device_deleted(id);
    auto ev = co_await sub.wait_for(std::move(deleted), slice);
    if (ev) break;
    if (!ev.error().is(qmp::errc::timeout)) co_return from_qmp(ev.error(), "waiting for DEVICE_DELETED");
    if (Clock::now() >= deadline) {
      auto secs = std::chrono::duration_cast<std::chrono::milliseconds>(ctx.timeouts.unplug);
      co_return Error(make_error_code(errc::guest_timeout),
                      what + ": the guest did not release the device within " +
                          std::to_string(secs.count()) +
                          " ms; it stays attached and whole (retry the removal later)");
    }
    if (progress) {
      double f = std::chrono::duration<double>(Clock::now() - start) /
                 std::chrono::duration<double>(ctx.timeouts.unplug);
      progress(std::min(f, 0.99), phase);
    }
  }
  if (progress) progress(1.0, what + " released by the guest");
  co_return Result<void>{};
}

awaitable<Result<bool>> device_del(Context& ctx, Domain& d, std::string id) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + ctx.timeouts.unplug;
  for (;;) {
    qmp::Command c = qmp::cmd::device_del(id);
    auto r = co_await call(ctx, d, std::move(c));
    if (r) co_return true;
    const Error& e = r.error();
    // Released by the guest after an earlier unplug timed out: only the back end is left.
    if (e.qmp_class == "DeviceNotFound") co_return false;
    // An earlier device_del is still pending in the guest: wait for its DEVICE_DELETED.
    if (e.qmp_desc.find("in the process of unplug") != std::string::npos) co_return true;
    // Native PCIe hot-plug refuses while the slot's power indicator blinks: retry.
    if (e.qmp_desc.find("busy") == std::string::npos || Clock::now() >= deadline) co_return e;
    asio::steady_timer t(ctx.ex, std::chrono::milliseconds(250));
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

awaitable<Result<void>> delete_node(Context& ctx, Domain& d, std::string node) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + ctx.timeouts.unplug;
  for (;;) {
    qmp::Command c = qmp::cmd::blockdev_del(node);
    auto r = co_await call(ctx, d, std::move(c));
    if (r) co_return Result<void>{};
    const std::string& desc = r.error().qmp_desc;
    if (desc.find("Failed to find node") != std::string::npos) co_return Result<void>{};
    const bool held = desc.find("in use") != std::string::npos || desc.find("busy") != std::string::npos;
    if (!held || Clock::now() >= deadline) co_return r.error();
    asio::steady_timer t(ctx.ex, std::chrono::milliseconds(20));
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

awaitable<Result<void>> unplug(Context& ctx, Domain& d, std::string id, std::string what,
                               ProgressFn progress) {
  auto q = qmp_client(d);
  if (!q) co_return q.error();
  auto sub = (*q)->subscribe();  // before device_del: the event may come at once
  auto present = co_await device_del(ctx, d, id);
  if (!present) co_return present.error();
  if (!*present) co_return Result<void>{};
  co_return co_await wait_deleted(ctx, sub, std::move(id), std::move(what), std::move(progress));
}

Error no_such_device(const Domain& d, std::string_view kind, const std::string& id) {
  Error e(make_error_code(errc::not_found),
          "id: domain " + d.name() + " has no " + std::string(kind) + " named '" + id + "'");
  e.field = "id";
  return e;
}

awaitable<Result<void>> ensure_scsi_controller(Context& ctx, Domain& d) {
  if (d.scsi_controller) co_return Result<void>{};
  auto slot = d.allocate_slot(std::string(kScsiController));
  if (!slot) co_return slot.error();
  const qmp::cmd::Device dev = qmp::cmd::virtio_scsi_pci(std::string(kScsiController), *slot);
  qmp::Command c = qmp::cmd::device_add(dev);
  auto r = co_await call(ctx, d, std::move(c));
  if (!r) {
    d.free_slot(*slot);
    co_return r.error();
  }
  d.scsi_controller = true;
  d.scsi_slot = *slot;
  co_return Result<void>{};
}

awaitable<void> Undo::run(Context& ctx, Domain& d) {
  while (!steps_.empty()) {
    Step s = std::move(steps_.back());
    steps_.pop_back();
    if (!s.cmd) {
      d.free_slot(s.slot);
      continue;
    }
    if (d.cold_plan) continue;  // a failed plan is dropped whole; QEMU never saw it
    auto r = co_await call(ctx, d, std::move(*s.cmd));
    if (!r) log::warn("rollback: " + r.error().describe());
  }
}

awaitable<Error> Undo::fail(Context& ctx, Domain& d, Error e) {
  co_await run(ctx, d);
  co_return e;
}

Result<ImageHeader> read_header(fdpass::BorrowedFd fd, std::string_view field) {
  std::array<unsigned char, 104> b{};
  ssize_t n;
  do {
    n = ::pread(fd.get(), b.data(), b.size(), 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    return Error(std::error_code(errno, std::system_category()),
                 std::string(field) + ": cannot read the image header");
  }
  auto be = [&](std::size_t off, std::size_t len) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < len; ++i) v = (v << 8) | b[off + i];
    return v;
  };
  ImageHeader h;
  if (n < 20 || be(0, 4) != 0x514649fbU) return h;  // "QFI\xfb"
  h.qcow2 = true;
  h.backing_file = be(8, 8) != 0;
  if (be(4, 4) >= 3 && n >= 80) h.external_data = (be(72, 8) & (1U << 2)) != 0;
  return h;
}

Result<void> check_format(const ImageHeader& h, DiskFormat format, bool backing_given) {
  if (format == DiskFormat::raw && h.qcow2) {
    return field_error("format", "the image is qcow2, not raw (a qcow2 image is never shown raw)");
  }
  if (format == DiskFormat::qcow2 && !h.qcow2) return field_error("format", "the image is not qcow2");
  if (h.external_data) {
    return field_error("path",
                       "qcow2 images with an external data file are refused: QEMU would open it by path");
  }
  if (h.backing_file && !backing_given) {
    return field_error("backing",
                       "the image names a backing file: pass it as 'backing' so the broker opens it");
  }
  if (format == DiskFormat::qcow2 && !h.backing_file && backing_given) {
    return field_error("backing", "the image has no backing file");
  }
  return {};
}

}  // namespace broker::flows::detail
