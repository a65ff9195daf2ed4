// broker/flows is one coroutine per operation on a domain, each rolled back on failure.
//
// The device flows (docs/architecture.md, "Flows"): each is one coroutine, written top to
// bottom, that opens what the user named with the broker's credentials, hands QEMU the fd over
// QMP and plugs the device, rolling back every completed step when a later one fails. They run
// inside a domain's job slot (the Broker claims it) on the broker's io_context. The flows sit
// above the domain layer (Domain, Domains, the event bus, requests) and below the Broker.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"
#include "broker/domain/domains.hpp"
#include "broker/domain/event_bus.hpp"
#include "broker/domain/requests.hpp"
#include "fdpass/opener.hpp"
#include "fdpass/unique_fd.hpp"
#include "qmp/commands.hpp"

namespace broker::flows {

struct Timeouts {
  std::chrono::milliseconds qmp{5000};       // one QMP command
  std::chrono::milliseconds unplug{10000};   // device_del -> DEVICE_DELETED (native pciehp ~6 s)
  std::chrono::milliseconds migrate_poll{50};  // save, restore: query-migrate for progress
  // save, restore: QEMU still not done this long after the broker's copy ended
  std::chrono::milliseconds migrate_settle{30000};
};

// How a VNC listener reaches QEMU. display_update hands QEMU the listening socket (QEMU 7.1+);
// add_client keeps the listener in the broker and hands QEMU each accepted connection; automatic
// tries display-update and falls back to add_client when QEMU refuses it.
enum class VncHandover { automatic, display_update, add_client };

struct Context {
  boost::asio::any_io_executor ex;
  const fdpass::ImageRoots& roots;
  EventBus& events;
  Timeouts timeouts;
  VncHandover vnc = VncHandover::automatic;  // tests force add_client to cover old QEMUs
  // The directory save files are written beneath and restored from (qbrokerd --save-root);
  // empty: save and restore are refused.
  std::string save_root;
};

// Set by a cancel (DELETE /v1/domains/{name}/job); the job's flow polls it and winds down.
using CancelFlag = std::shared_ptr<bool>;

using boost::asio::awaitable;

// Create: spawn, connect, plug the request's devices before the guest runs, cont. Holds the
// domain's job slot as "create" until the domain is up; tears it down by uid on any failure.
awaitable<Result<std::shared_ptr<Domain>>> create(Context& ctx, Domains& domains, CreateDomain request);

// CD: a scsi-cd drive with an empty tray (created with the domain), then media in and out.
awaitable<Result<void>> add_cdrom_drive(Context& ctx, Domain& d, CdromSpec cd);
awaitable<Result<void>> insert_medium(Context& ctx, Domain& d, std::string id, InsertMedium m);
awaitable<Result<void>> eject_medium(Context& ctx, Domain& d, std::string id, bool force);

// Disks: hotplug and unplug (scsi-hd on virtio-scsi, or virtio-blk-pci on a root port).
awaitable<Result<void>> add_disk(Context& ctx, Domain& d, DiskSpec disk);
awaitable<Result<void>> remove_disk(Context& ctx, Domain& d, std::string id, ProgressFn progress);

// NICs: a tap opened by the broker in the host netns, passed with getfd.
awaitable<Result<void>> add_nic(Context& ctx, Domain& d, NicSpec nic);
awaitable<Result<void>> remove_nic(Context& ctx, Domain& d, std::string id, ProgressFn progress);

// VNC: a listener bound by the broker in the host netns, handed over with display-update.
awaitable<Result<VncState>> set_vnc(Context& ctx, Domain& d, VncSpec vnc);
awaitable<Result<void>> remove_vnc(Context& ctx, Domain& d);

// Save: streams the domain's state through a pipe (getfd + migrate fd:) into a temp file beneath
// the save root, with the broker's header and trailer, then fsyncs and renames it over `path`.
// The domain is left as it was (running or paused); the caller destroys it unless asked to keep
// it. A failure or cancel removes the temp file and leaves the domain running as before.
awaitable<Result<void>> save(Context& ctx, Domain& d, SaveRequest request, CancelFlag cancel);
// Restore: a fresh jailed QEMU (new uid) started with -incoming defer, the saved devices
// re-plugged from disks whose identity is unchanged, the stream fed through a pipe
// (migrate-incoming fd:), checked against the trailer, then cont unless `paused`. Any failure
// tears the new domain down by uid.
awaitable<Result<std::shared_ptr<Domain>>> restore(Context& ctx, Domains& domains,
                                                   RestoreRequest request, CancelFlag cancel);
// The temp file a save of domain `domain` to `path` writes before its rename (journaled, so a
// restarted broker can remove it).
std::string save_temp_path(const std::string& path, const std::string& domain);
// Live update: the domain moves to a fresh jailed QEMU (new uid) under the same broker while its
// guest runs, over a socketpair whose ends the two QEMUs get with getfd. On success the returned
// domain has taken `old`'s place in the table and record and the old QEMU is killed by its uid;
// on failure or cancel the new QEMU is killed and the old one runs on as before.
awaitable<Result<std::shared_ptr<Domain>>> live_update(Context& ctx, Domains& domains,
                                                       std::shared_ptr<Domain> old, CancelFlag cancel);
// After a restart, or a failed update: the old QEMU's listeners and log under their own names again.
void put_back(Domain& d);

// Live migration between two brokers (broker/flows/migrate.cpp has the steps).
struct IncomingRequest {
  boost::json::value domain;  // as the source describes it (described_domain_of)
  bool paused = false;        // stays paused once it has arrived
  std::string listen_dir;     // where the one-time listener is made (RUN/migrate)
  // The writable disks come by NBD (mirrored_disks): each is opened here at the path the source
  // describes, must not be the source's own image when `same_host`, and is exported writable.
  bool copy_storage = false;
  bool same_host = false;
};
struct Incoming {
  std::shared_ptr<Domain> domain;  // spawned with -incoming defer, its devices plugged
  std::string token;               // the source sends it first on the connection
  std::string endpoint;            // the listener's path
  fdpass::UniqueFd listener;
  JobGuard job;                    // "incoming", until the state has arrived
  std::string nbd_endpoint;        // copy_storage: QEMU's NBD listener, removed once the state arrived
};
// The disks copy_storage mirrors: every writable one. Read-only disks and CDs are shared as for
// a migration without it.
std::vector<std::string> mirrored_disks(const Domain& d);
// copy_storage, at the source: the disks to mirror into the destination's exports (each named
// as its disk) on the NBD listener at `nbd_endpoint`, before the switch-over. Between hosts the
// caller makes the connections itself (each a socketpair end it relays) and gives them in
// `connected`, by disk id.
struct StorageCopy {
  std::string nbd_endpoint;
  std::vector<std::string> disks;
  std::map<std::string, fdpass::UniqueFd> connected;
};
// Destination, first half: the described domain's disks and media checked as a restore checks
// them, the name reserved, QEMU spawned and its devices plugged, a one-time listener made. Any
// failure tears the domain down by uid.
awaitable<Result<Incoming>> prepare_incoming(Context& ctx, Domains& domains, IncomingRequest request);
// Destination, second half: one connection accepted within `wait`, the token checked, the state
// taken (migrate-incoming fd:), cont unless paused, the record written. Any failure or a cancel
// tears the domain down by uid.
awaitable<Result<void>> receive_incoming(Context& ctx, Domains& domains, Incoming in,
                                         std::chrono::milliseconds wait, CancelFlag cancel);
// Source: connects to `endpoint`, sends `token`, hands the connection to QEMU (migrate fd:) and
// follows the migration until it ends. Success: all the state went, the guest is paused here.
// Failure or cancel: the guest runs here again as it did.
// With `storage`, the disks are mirrored first (job progress phase "storage") until every copy is
// level; the migration then pauses before its switch-over, the copies are brought level with
// the stopped guest and closed, and only then does the switch-over happen.
awaitable<Result<void>> send_state(Context& ctx, Domain& d, std::string endpoint,
                                   std::string token, CancelFlag cancel, StorageCopy storage = {});
// The same over a connected stream the caller made (a socketpair whose other end it relays).
awaitable<Result<void>> send_state_fd(Context& ctx, Domain& d, fdpass::UniqueFd peer,
                                      CancelFlag cancel, StorageCopy storage = {});
// cont, when the guest is not running: a source whose destination gave the domain up.
awaitable<Result<void>> resume_here(Context& ctx, Domain& d);
// After a restart: winds down a migration an earlier broker left (journal `args`). A migration
// still going is cancelled and the guest resumed, as for a save. One QEMU reports completed
// leaves the guest paused, since the destination may run it, and returns true: the caller asks
// the destination (Broker::settle_interrupted_migration).
awaitable<bool> recover_migrate(Context& ctx, Domain& d, boost::json::object args);
// What the source sends of a domain: its spec and devices, as a save file's header holds them.
// copy_storage: `disk_paths` puts disks at the destination's own paths.
boost::json::value described_domain_of(const Domain& d,
                                       const std::map<std::string, std::string>& disk_paths = {});

// After a restart: winds down a save an earlier broker left (journal `args`): cancels QEMU's
// migration, removes the temp file and resumes a guest the save had running.
awaitable<void> recover_save(Context& ctx, Domain& d, boost::json::object args);

}  // namespace broker::flows
