// The QEMU install a launcher runs: which paths it accepts, what its jail binds, and how the
// QMP monitor is chosen from what the binary lists.
#include "broker/lifecycle/qemu_install.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>

#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace broker::lifecycle;
using namespace std::chrono_literals;

namespace {

// An executable shell script at `path` (0755, so an unprivileged probe can run it).
void script(const std::string& path, const std::string& body) {
  qbtest::write_file(path, "#!/bin/sh\n" + body + "\n");
  REQUIRE(::chmod(path.c_str(), 0755) == 0);
}

std::string complaint(const QemuInstall& q) {
  auto ok = check_qemu_install(q);
  REQUIRE_FALSE(ok);
  return ok.error().describe();
}

}  // namespace

TEST_CASE("the QMP monitor type is found in -object help, a line of its own", "[lifecycle][qemu-install]") {
  CHECK(lists_monitor_object("List of user creatable objects:\n  authz-list\n  monitor-qmp\n  tls-creds\n"));
  CHECK(lists_monitor_object("objects:\r\n  monitor-qmp\r\n"));
  CHECK(lists_monitor_object("  monitor-qmp"));
  CHECK_FALSE(lists_monitor_object("List of user creatable objects:\n  authz-list\n  memory-backend-ram\n"));
  CHECK_FALSE(lists_monitor_object("  monitor-qmp-extra\n  x-monitor-qmp\n"));
  CHECK_FALSE(lists_monitor_object(""));
}

TEST_CASE("the monitor arguments follow the probe", "[lifecycle][qemu-install]") {
  QemuInstall q;
  CHECK(monitor_args(q, "qmp") == std::vector<std::string>{"-mon", "chardev=qmp,mode=control"});
  q.monitor_object = true;
  CHECK(monitor_args(q, "qmp") ==
        std::vector<std::string>{"-object", "monitor-qmp,id=qmp-monitor,chardev=qmp"});
}

TEST_CASE("a QEMU outside /usr shows its jail its binary's directory and its data directories",
          "[lifecycle][qemu-install]") {
  auto none = jail_binds_of(QemuInstall{});
  CHECK(none.exec_dirs.empty());
  CHECK(none.data_dirs.empty());
  none = jail_binds_of({"/usr/local/bin/qemu", {"/usr/share/seabios"}, false});
  CHECK(none.exec_dirs.empty());
  CHECK(none.data_dirs.empty());
  auto b = jail_binds_of({"/opt/q/usr/bin/qemu-system-x86_64",
                          {"/opt/q/usr/share/qemu", "/usr/share/seabios", "/opt/q/usr/share/qemu",
                           "/usrx", "/opt/q/usr/bin"},
                          false});
  CHECK(b.exec_dirs == std::vector<std::string>{"/opt/q/usr/bin"});
  CHECK(b.data_dirs == std::vector<std::string>{"/opt/q/usr/share/qemu", "/usrx"});
}

TEST_CASE("a QEMU install is refused by name when its paths are not plain, present and root's",
          "[lifecycle][qemu-install]") {
  qbtest::TempDir dir;
  CHECK(complaint({"qemu-system-x86_64", {}, false}).find("absolute, normal") != std::string::npos);
  CHECK(complaint({"/usr/bin/../bin/qemu-system-x86_64", {}, false}).find("qemu-system-x86_64") !=
        std::string::npos);
  CHECK(complaint({dir / "missing", {}, false}).find(dir / "missing") != std::string::npos);
  CHECK(complaint({dir.path(), {}, false}).find("is not a regular file") != std::string::npos);
  // The system's QEMU passes; a data directory must then pass too.
  const std::string system_qemu = "/usr/bin/qemu-system-x86_64";
  REQUIRE(check_qemu_install({system_qemu, {"/usr/share/qemu"}, false}));
  CHECK(complaint({system_qemu, {"/usr/share/qemu/"}, false}).find("normal") != std::string::npos);
  CHECK(complaint({system_qemu, {"/"}, false}).find("below /") != std::string::npos);
  CHECK(complaint({system_qemu, {system_qemu}, false}).find("is not a directory") != std::string::npos);
}

TEST_CASE("a QEMU install another user could change is refused", "[lifecycle][qemu-install][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir dir;
  REQUIRE(::chmod(dir.path().c_str(), 0755) == 0);
  const std::string bin = dir / "qemu";
  script(bin, "exit 0");
  REQUIRE(check_qemu_install({bin, {}, false}));
  REQUIRE(::chmod(bin.c_str(), 0775) == 0);
  CHECK(complaint({bin, {}, false}).find("writable by its group or by others") != std::string::npos);
  REQUIRE(::chmod(bin.c_str(), 0755) == 0);
  REQUIRE(::chown(bin.c_str(), 65534, 0) == 0);
  CHECK(complaint({bin, {}, false}).find("belongs to uid 65534") != std::string::npos);
  REQUIRE(::chown(bin.c_str(), 0, 0) == 0);
  REQUIRE(::chmod(dir.path().c_str(), 0777) == 0);  // its directory: anyone could swap it
  CHECK(complaint({bin, {}, false}).find(dir.path() + " is writable") != std::string::npos);
  REQUIRE(::chmod(dir.path().c_str(), 0755) == 0);
  REQUIRE(::symlink(bin.c_str(), (dir / "link").c_str()) == 0);
  CHECK(complaint({dir / "link", {}, false}).find("is not a regular file") != std::string::npos);
}

TEST_CASE("the monitor probe runs the binary unprivileged and reads what it lists",
          "[lifecycle][qemu-install][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  // Neither Debian's QEMU 7.2 nor 10.0 has a monitor-qmp object: both keep -mon.
  auto real = probe_monitor_object(qbtest::qemu_binary());
  REQUIRE(real);
  CHECK_FALSE(*real);

  qbtest::TempDir dir;
  REQUIRE(::chmod(dir.path().c_str(), 0755) == 0);
  script(dir / "lists", R"(echo "List of user creatable objects:"; echo "  monitor-qmp")");
  auto listed = probe_monitor_object(dir / "lists");
  REQUIRE(listed);
  CHECK(*listed);
  // It runs as nobody, with nothing of the daemon's environment.
  script(dir / "who",
         R"sh([ "$(id -u)" = 65534 ] && [ "$(tr -d '\000' < /proc/$$/environ | wc -c)" = 0 ] &&
echo "  monitor-qmp")sh");
  auto who = probe_monitor_object(dir / "who");
  REQUIRE(who);
  CHECK(*who);

  script(dir / "fails", "echo '  monitor-qmp'; exit 1");
  CHECK_FALSE(probe_monitor_object(dir / "fails"));
  // A binary that never answers is killed by pid at the deadline and reaped.
  script(dir / "hangs", "exec sleep 1000");
  auto started = std::chrono::steady_clock::now();
  auto hung = probe_monitor_object(dir / "hangs", 300ms);
  REQUIRE_FALSE(hung);
  CHECK(hung.error().describe().find("within 300 ms") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - started < 5s);
}
