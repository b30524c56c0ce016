KERNEL=2.6.26-1-amd64
NAME=fukano
kvm -smp 2 \
-drive if=ide,file=/dev/internal/kvm_win,boot=on \
-drive if=ide,file=/export/slow/win.iso,media=cdrom,boot=off \
-boot d \
-m 2048 \
-daemonize \
-no-shutdown \
-name ${NAME} \
-net none
