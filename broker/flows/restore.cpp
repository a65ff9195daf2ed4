// Restore: a saved domain back in a fresh jailed QEMU, which never opens the save file.
//
//   open the file beneath the save root -> preamble, header, trailer checked -> every disk and
//   medium reopened as hotplug opens it, refused when gone or no longer the same object ->
//   reserve the name -> spawn (new uid) with -S -incoming defer, or take a QEMU the warm pool
//   spawned so for the domain's shape -> QMP -> re-plug the devices on
//   the ports they had -> identities checked again on what QEMU was given -> pipe -> getfd (read
//   end) -> migrate-incoming fd:qb-migrate -> copy thread file -> pipe -> follow -> checksum ->
//   cont unless paused.
// Any failure after the spawn tears the new domain down by uid; before it, nothing was started.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/json.hpp>

#include "broker/core/errc.hpp"
#include "broker/domain/state_file.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "broker/flows/save_file.hpp"
#include "broker/flows/stream.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/errc.hpp"

namespace broker::flows {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using namespace detail;

namespace {

// What the save file holds, checked before anything is started.
struct Saved {
  fdpass::UniqueFd file;
  save_file::Layout layout;
  std::shared_ptr<Domain> domain;  // as saved: spec and devices, no instance
};

Result<Saved> open_saved(Context& ctx, const RestoreRequest& r) {
  auto target = open_target(ctx.save_root, r.path, r.name);
  if (!target) return target.error();
  fdpass::UniqueFd file(
      ::openat(target->dir.get(), target->name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!file) return errno_error(errno, "path: cannot open the save file " + r.path, "path");
  struct stat st {};
  if (::fstat(file.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return field_error("path", r.path + " is not a regular file");
  }
  auto layout = save_file::read_layout(file, "path");
  if (!layout) return layout.error();
  // The header holds no instance: the record reader wants one, and gets an empty one.
  json::object o = layout->domain.as_object();
  o["instance"] = json::object{{"uid", 0},  {"pid", 0},      {"start_time", 0}, {"accel", "tcg"},
                               {"qmp", ""}, {"console", ""}, {"log", ""}};
  auto domain = domain_from_json(o);
  if (!domain)
    return field_error("path", "the save file's header is corrupt: " + domain.error().message);
  return Saved{std::move(file), std::move(*layout), std::move(*domain)};
}

// `path` opened again as hotplug opens it, refused when gone or no longer `was`.
Result<void> check_same(Context& ctx, const std::string& path, const fdpass::Identity& was,
                        const std::string& field) {
  auto opened = ctx.roots.open(path, {.access = fdpass::Access::read_only});
  if (!opened) {
    Error e = from_open(opened.error(), field, path);
    e.context("the saved domain's disk cannot be opened again");
    return e;
  }
  if (!opened->identity.same_object(was)) {
    Error e(make_error_code(fdpass::errc::identity_changed),
            field + ": " + path + " is no longer the file the domain was saved with");
    e.field = field;
    return e;
  }
  return {};
}

}  // namespace

namespace detail {

Result<void> check_identities(Context& ctx, const Domain& saved,
                              const std::vector<std::string>& fresh) {
  for (const auto& [id, disk] : saved.disks) {
    if (std::find(fresh.begin(), fresh.end(), id) != fresh.end()) continue;
    if (auto ok = check_same(ctx, disk.spec.path, disk.identity, "disks." + id); !ok) return ok;
  }
  for (const auto& [id, cd] : saved.cdroms) {
    if (cd.path.empty()) continue;
    if (auto ok = check_same(ctx, cd.path, cd.identity, "cdroms." + id); !ok) return ok;
  }
  return {};
}

}  // namespace detail

namespace {


// The same check on what the flows opened and handed to QEMU, so a file swapped between the
// first check and the plug is still caught.
Result<void> check_plugged(const Domain& d, const Domain& saved,
                           const std::vector<std::string>& fresh) {
  for (const auto& [id, disk] : saved.disks) {
    if (std::find(fresh.begin(), fresh.end(), id) != fresh.end()) continue;
    auto it = d.disks.find(id);
    if (it != d.disks.end() && it->second.identity.same_object(disk.identity)) continue;
    Error e(make_error_code(fdpass::errc::identity_changed),
            "disks." + id + ": " + disk.spec.path + " changed while the domain was being restored");
    e.field = "disks." + id;
    return e;
  }
  for (const auto& [id, cd] : saved.cdroms) {
    auto it = d.cdroms.find(id);
    if (cd.path.empty() || (it != d.cdroms.end() && it->second.identity.same_object(cd.identity)))
      continue;
    Error e(make_error_code(fdpass::errc::identity_changed),
            "cdroms." + id + ": " + cd.path + " changed while the domain was being restored");
    e.field = "cdroms." + id;
    return e;
  }
  return {};
}

std::optional<std::uint32_t> boot_index(const lifecycle::DomainSpec& spec, const std::string& id) {
  auto it = std::find(spec.boot_order.begin(), spec.boot_order.end(), id);
  if (it == spec.boot_order.end()) return std::nullopt;
  return static_cast<std::uint32_t>(it - spec.boot_order.begin());
}

unsigned port_number(const std::string& slot) {
  return slot.size() > 2 ? static_cast<unsigned>(std::stoul(slot.substr(2))) : 0;
}

// A device that sits on a root port of its own; re-plugged in port order, each on its old port.
struct PortDevice {
  unsigned port = 0;
  enum class Kind { scsi_controller, disk, nic } kind = Kind::disk;
  std::string id;
};

std::vector<PortDevice> port_devices(const Domain& saved) {
  std::vector<PortDevice> out;
  if (saved.scsi_controller)
    out.push_back({port_number(saved.scsi_slot), PortDevice::Kind::scsi_controller, {}});
  for (const auto& [id, disk] : saved.disks) {
    if (disk.spec.bus == DiskBus::virtio)
      out.push_back({port_number(disk.slot), PortDevice::Kind::disk, id});
  }
  for (const auto& [id, nic] : saved.nics)
    out.push_back({port_number(nic.slot), PortDevice::Kind::nic, id});
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.port < b.port; });
  return out;
}

DiskSpec disk_spec(const Domain& saved, const std::string& id) {
  const DiskState& st = saved.disks.at(id);
  DiskSpec spec = st.spec;
  if (st.identity.kind == fdpass::Identity::Kind::block) spec.diskseq = st.identity.diskseq;
  spec.bootindex = boot_index(saved.spec(), id);
  return spec;
}

// Plugs one root-port device: the free ports below its old one are held meanwhile, so the flow,
// which takes the lowest free port, lands on the same port as before.
awaitable<Result<void>> plug_on_port(Context& ctx, Domain& d, const Domain& saved, PortDevice dev) {
  std::vector<std::string> held;
  for (unsigned i = 1; i < dev.port; ++i) {
    std::string slot = names::root_port(i);
    if (d.slots().contains(slot)) continue;
    d.claim_slot(slot, "qb-restore");
    held.push_back(std::move(slot));
  }
  Result<void> r;
  if (dev.kind == PortDevice::Kind::scsi_controller) r = co_await ensure_scsi_controller(ctx, d);
  if (dev.kind == PortDevice::Kind::disk) r = co_await add_disk(ctx, d, disk_spec(saved, dev.id));
  if (dev.kind == PortDevice::Kind::nic) {
    const NicState& nic = saved.nics.at(dev.id);
    NicSpec spec{nic.spec.id, nic.tap, nic.spec.mac};
    r = co_await add_nic(ctx, d, std::move(spec));
  }
  for (const auto& slot : held) d.free_slot(slot);
  co_return r;
}

}  // namespace

namespace detail {

awaitable<Result<void>> replug(Context& ctx, Domain& d, const Domain& saved,
                               const std::vector<std::string>& fresh) {
  for (const auto& dev : port_devices(saved)) {
    if (auto ok = co_await plug_on_port(ctx, d, saved, dev); !ok) co_return ok.error();
  }
  for (const auto& [id, cd] : saved.cdroms) {
    CdromSpec spec{id, {}, boot_index(saved.spec(), id)};
    if (auto ok = co_await add_cdrom_drive(ctx, d, std::move(spec)); !ok) co_return ok.error();
    if (cd.path.empty()) continue;
    InsertMedium medium{cd.path, false};
    std::string drive = id;
    if (auto ok = co_await insert_medium(ctx, d, std::move(drive), std::move(medium)); !ok)
      co_return ok.error();
  }
  for (const auto& [id, disk] : saved.disks) {
    if (disk.spec.bus != DiskBus::scsi) continue;
    if (auto ok = co_await add_disk(ctx, d, disk_spec(saved, id)); !ok) co_return ok.error();
  }
  co_return check_plugged(d, saved, fresh);
}

}  // namespace detail

namespace {

// The stream, from the file through a pipe into QEMU, checked against the trailer.
awaitable<Result<void>> stream_from(Context& ctx, Domain& d, Saved& saved, const std::string& path,
                                    CancelFlag cancel) {
  auto pipe = fdpass::make_pipe();
  if (!pipe) co_return errno_error(pipe.error().value(), "restore: cannot make a pipe");
  ::fcntl(pipe->second.get(), F_SETPIPE_SZ, 1 << 20);
  const std::string fd_name(kStreamFd);
  if (auto sent = co_await getfd(ctx, d, pipe->first, fd_name); !sent) co_return sent.error();
  pipe->first.reset();  // QEMU holds the read end now
  qmp::Command incoming = qmp::cmd::migrate_incoming_fd(fd_name);
  if (auto ok = co_await call(ctx, d, std::move(incoming)); !ok) co_return ok.error();
  auto wake = std::make_shared<asio::steady_timer>(ctx.ex);
  const auto& layout = saved.layout;
  save_file::StreamCopy::Options how{.src_offset = layout.stream_offset,
                                     .limit = layout.stream_length,
                                     .crc = layout.header_crc,
                                     .own_src = {},
                                     .own_dst = std::move(pipe->second)};
  auto copy = std::make_unique<save_file::StreamCopy>(ctx.ex, wake, saved.file,
                                                      fdpass::BorrowedFd(), std::move(how));
  Follow what{"restore", false, layout.stream_length};
  auto info = co_await follow(ctx, d, *copy, wake, std::move(what), cancel);
  const bool was_cancelled = cancel && *cancel;
  const int copy_error = copy->error();
  const std::uint32_t crc = copy->crc();
  copy.reset();
  if (was_cancelled) co_return cancelled("the restore of " + path);
  if (copy_error != 0)
    co_return errno_error(copy_error, "path: feeding the saved state of " + path + " to QEMU",
                          "path");
  if (crc != layout.crc) {
    co_return field_error("path", path + " is corrupt: its checksum does not match its trailer");
  }
  if (!info) co_return info.error();
  if (info->status != "completed") {
    co_return Error(make_error_code(errc::qemu_error),
                    "QEMU refused the saved state of " + path + ": " + info->status + ": " +
                        info->error_desc.value_or("no reason given"));
  }
  co_return Result<void>{};
}

awaitable<Result<void>> bring_up(Context& ctx, Domains& domains, std::shared_ptr<Domain> d,
                                 Saved& saved, const RestoreRequest& request, CancelFlag cancel) {
  if (auto ok = co_await domains.attach(d); !ok) co_return ok.error();
  d->set_state(RunState::paused);
  if (auto ok = co_await replug(ctx, *d, *saved.domain); !ok) co_return ok.error();
  if (auto ok = co_await stream_from(ctx, *d, saved, request.path, cancel); !ok)
    co_return ok.error();
  if (!request.paused) {
    qmp::Command cont = qmp::cmd::cont();
    if (auto ok = co_await call(ctx, *d, std::move(cont)); !ok) co_return ok.error();
    d->set_state(RunState::running);
  }
  co_return Result<void>{};
}

}  // namespace

awaitable<Result<std::shared_ptr<Domain>>> restore(Context& ctx, Domains& domains,
                                                   RestoreRequest request, CancelFlag cancel) {
  auto saved = open_saved(ctx, request);
  if (!saved) co_return saved.error();
  if (auto ok = check_identities(ctx, *saved->domain); !ok) co_return ok.error();
  lifecycle::DomainSpec spec = saved->domain->spec();
  spec.name = request.name;
  spec.paused = request.paused;
  auto reserved = domains.reserve(std::move(spec));
  if (!reserved) co_return reserved.error();
  auto d = *reserved;
  const std::string name = d->name();
  auto job = d->begin_job("restore", {}, {{"path", request.path}});
  ctx.events.publish(name, "domain", "starting", {{"restoring", request.path}});
  // A QEMU of the domain's shape that the pool spawned with -incoming defer saves the spawn; the
  // refill waits meanwhile, as it does for a create.
  auto refill_held = domains.pool().hold_refill();
  auto pooled = co_await domains.launch_pooled(d, PoolUse::restore);
  if (!pooled) co_return pooled.error();
  if (!*pooled) {
    std::vector<std::string> incoming{"-incoming", "defer"};
    if (auto ok = co_await domains.launch(d, nullptr, incoming); !ok) co_return ok.error();
  }
  if (auto ok = co_await bring_up(ctx, domains, d, *saved, request, cancel); !ok) {
    co_await domains.teardown(d, false);
    ctx.events.publish(name, "domain", "failed", {{"error", ok.error().describe()}});
    co_return ok.error();
  }
  job->release();
  if (auto ok = co_await domains.records().persist(*d); !ok) {
    co_await domains.teardown(d, false);
    ctx.events.publish(name, "domain", "failed", {{"error", ok.error().describe()}});
    co_return ok.error();
  }
  ctx.events.publish(
      name, "domain", "restored",
      {{"uid", d->instance().uid},
       {"pid", d->instance().pid},
       {"from", request.path},
       {"pooled", d->instance().pooled}});
  co_return d;
}

}  // namespace broker::flows
